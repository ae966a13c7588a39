"""The one exception the boot code raises for bad inputs (kernel, command line, initrd)."""


class BootError(ValueError):
    """The kernel image, command line or initrd cannot be loaded; the message says why."""
