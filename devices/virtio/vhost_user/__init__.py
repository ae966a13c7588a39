"""vhost-user: a virtio device served from its own process (the back-end side).

The split follows crosvm (`crosvm device fs --socket ...`) and virtiofsd: the VMM (the front-end,
e.g. QEMU with `-device vhost-user-fs-device`) keeps the virtio transport registers and hands the
back-end, over a Unix socket, everything needed to serve the rings without it: guest RAM as file
descriptors (SET_MEM_TABLE), each ring's layout (SET_VRING_NUM/ADDR/BASE), the eventfd the guest's
notifications arrive on (SET_VRING_KICK) and the eventfd that raises the guest's interrupt
(SET_VRING_CALL). After that a request goes guest -> kick eventfd -> our device worker -> call
eventfd -> guest, and never through the front-end's process.

Layers, h11 style (each testable without the next):

- `protocol`: the wire format, sans I/O -- header, payload structs, constants from QEMU's
  docs/interop/vhost-user.rst, `decode_*` raising ProtocolError on anything malformed.
- `connection`: framing on a stream socket, SCM_RIGHTS descriptors, deadlines.
- `memory`: guest RAM mmap'd from the received fds: a `devices.memory.GuestMemory` plus the
  front-end-user-address -> guest-physical translation the ring addresses need.
- `interrupt`: one call eventfd per queue behind the `VirtioInterrupt` interface.
- `backend`: the message state machine; it builds ordinary `Queue`s and calls the unchanged
  `VirtioDevice.activate(memory, interrupt, queues, queue_events)`, so the split-ring code, the
  FUSE server and the passthrough file system are the same as behind virtio-mmio.
- `backend_req`: the back-end request channel (SET_SLAVE_REQ_FD) for virtio-fs DAX: the
  back-end's FS_MAP/FS_UNMAP end as a DAX window mapper, and the front-end's end that applies
  them to its window after checking them.
- `server`: the listening socket and the process's main loop (one front-end at a time, surviving
  each one's departure).

`vmm/device_backend.py` is the command line around it (`python -m vmm device fs`).
"""
