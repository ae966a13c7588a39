"""The host's /dev/fuse as a second transport for the FUSE server (`python -m vmm fuse-mount`).

`mount.py` mounts (mount(2) as root, fusermount3 otherwise), `session.py` runs the serving threads
(read a request, `fuse.Server.handle`, write the reply), `buffers.py` is the Reader/Writer over
their buffers, and `share.py` puts a shared directory's passthrough and server behind them.
"""

from .mount import FuseMount, MountError, mount_fuse
from .session import FuseDevCounters, FuseSession
from .share import HostShare

__all__ = ["FuseMount", "MountError", "mount_fuse", "FuseDevCounters", "FuseSession", "HostShare"]
