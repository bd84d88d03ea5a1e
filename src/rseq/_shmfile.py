"""Shared files that trust nobody: the one home of file handling for every
shared-memory structure of the package (arenas, rings, pools, metrics).

``/dev/shm`` is writable by every user of the machine, so a name there may
have been taken by somebody else before us, may be a symbolic link, a FIFO
or a device, may be writable by others, or may be damaged.  The rules:

- Creation: the file is made under a temporary name in the same directory
  with ``O_EXCL | O_NOFOLLOW`` and mode 0600, its space is reserved with
  ``posix_fallocate`` (a tmpfs that cannot supply a page would otherwise
  kill with SIGBUS whoever touches it first, at any later instant), its
  header is written and it is mapped; only when all of that succeeded is it
  published under its name with ``link()``, which fails if the name exists.
  Every error path removes the temporary file.
- Opening: the name is opened with ``O_PATH | O_NOFOLLOW`` (no read, no
  write, no side effect on a FIFO or device), checked (a regular file, owned
  by the effective uid or root, or a uid the caller trusts, and not writable
  by group or others unless the caller trusts that group), and only then
  reopened for reading, or reading and writing, through ``/proc/self/fd``;
  the reopened descriptor must be the same inode.
- Validation of the contents (magic, version, layout, checksum) belongs to
  each structure; :class:`HeaderFormat` is the common frame.

Limits that remain: an owner who truncates its own file while others map it
makes them fault (SIGBUS) on access, as with any shared mapping.
"""
from __future__ import annotations

import contextlib
import errno
import grp
import mmap
import os
import pwd
import stat
import struct
import zlib
from collections.abc import Callable

from . import _core

SHM_DIR = "/dev/shm"
MODE = 0o600
NAME_MAX = 255
PATH_MAX = 4096


def path_for(name: str | os.PathLike, what: str = "arena") -> str:
    """The path of a shared file: a name without a slash lives in /dev/shm,
    anything else is a path.  ValueError for a name that cannot be one."""
    text = os.fspath(name)
    if not isinstance(text, str):
        raise TypeError(f"{what} name must be str or a path, not {type(name).__name__}")
    if not text:
        raise ValueError(f"{what} name is empty")
    if "\0" in text:
        raise ValueError(f"{what} name contains a NUL character: {text!r}")
    path = text if "/" in text else os.path.join(SHM_DIR, text)
    base = os.path.basename(path)
    if base in ("", ".", ".."):
        raise ValueError(f"invalid {what} name {text!r}: it names a directory, not a file")
    try:
        encoded_base = os.fsencode(base)
    except UnicodeEncodeError:
        raise ValueError(f"invalid {what} name {text!r}: not encodable") from None
    if len(encoded_base) > NAME_MAX:
        raise ValueError(f"invalid {what} name: its last component is {len(encoded_base)} "
                         f"bytes, the file system takes at most {NAME_MAX}")
    if len(os.fsencode(path)) >= PATH_MAX:
        raise ValueError(f"invalid {what} name: the path is longer than {PATH_MAX - 1} bytes")
    return path


def _temporary_name(directory: str) -> str:
    # Fixed length, independent of the final name, so that any name that
    # passes path_for() also has a temporary name that fits.
    return os.path.join(directory, f".rseq-{os.urandom(8).hex()}.tmp")


def _reserve(fd: int, size: int, what: str, path: str) -> None:
    """Reserve ``size`` bytes for real, so no later page fault can fail."""
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space to create {what} {path!r} "
                          f"({size} bytes): the file system is full", path) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise OSError(e.errno, f"cannot reserve {size} bytes for {what} {path!r}: "
                          f"posix_fallocate: {os.strerror(e.errno)}", path) from None
    # A file system without fallocate: write the zeros, which allocates.
    os.ftruncate(fd, size)
    chunk = bytes(1 << 20)
    offset = 0
    while offset < size:
        try:
            offset += os.pwrite(fd, chunk[:min(len(chunk), size - offset)], offset)
        except OSError as e:
            raise OSError(e.errno, f"cannot reserve {size} bytes for {what} {path!r}: "
                          f"{os.strerror(e.errno)}", path) from None


def create(name: str | os.PathLike, size: int, header: bytes | Callable[[int], bytes],
           *, what: str = "arena",
           prepare: Callable[[mmap.mmap], object] | None = None) -> tuple[str, mmap.mmap]:
    """Create, reserve, initialise, map and publish a shared file.

    ``header`` (bytes, or a function of the mapping's size returning bytes) is
    written at offset 0 before the file is published.  ``prepare(mapping)``,
    if given, runs after the mapping is made and before the file is
    published: whatever can fail in building the structure over the mapping
    belongs there, so that a failure leaves nothing.  Returns the path and
    a shared read-write mapping of ``size`` bytes.  FileExistsError names the
    file when the name is taken; OSError(ENOSPC) when there is no room.
    Nothing is left behind on any error.
    """
    path = path_for(name, what)
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"{what} size must be a positive int, not {size!r}")
    directory = os.path.dirname(path) or "."
    temporary = _temporary_name(directory)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temporary, flags, MODE)
    except OSError as e:
        raise OSError(e.errno, f"cannot create {what} {path!r}: {os.strerror(e.errno)} "
                      f"(in {directory!r})", path) from None
    mapping = None
    try:
        # fchmod: the process umask may have removed bits, never added them,
        # but be explicit about what we publish.
        os.fchmod(fd, MODE)
        _reserve(fd, size, what, path)
        data = header(size) if callable(header) else header
        os.pwrite(fd, data, 0)
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if prepare is not None:
            prepare(mapping)
        try:
            # link() publishes the complete file atomically, and fails if
            # the name exists: nobody ever opens a half-initialised file.
            os.link(temporary, path)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, f"{what} {path!r} already exists",
                                  path) from None
        except OSError as e:
            raise OSError(e.errno, f"cannot publish {what} {path!r}: "
                          f"{os.strerror(e.errno)}", path) from None
    except BaseException:
        if mapping is not None:
            # A structure that prepare() built over the mapping may still
            # export its buffer: then the mapping goes when that does.
            with contextlib.suppress(BufferError):
                mapping.close()
        raise
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
    return path, mapping


def _uid_of(who: int | str) -> int:
    if isinstance(who, int):
        return who
    try:
        return pwd.getpwnam(who).pw_uid
    except KeyError:
        raise ValueError(f"trust names an unknown user: {who!r}") from None


def _gid_of(who: int | str) -> int:
    if isinstance(who, int):
        return who
    try:
        return grp.getgrnam(who).gr_gid
    except KeyError:
        raise ValueError(f"trust names an unknown group: {who!r}") from None


def _parse_trust(trust: object) -> tuple[set[int], set[int]]:
    """``trust``: None, a uid or user name, ``"group:NAME"`` / ``("group",
    gid)``, or a list of those.  Returns (trusted uids, trusted gids)."""
    uids: set[int] = set()
    gids: set[int] = set()
    if trust is None:
        return uids, gids
    items = trust if isinstance(trust, (list, set, frozenset)) else [trust]
    for item in items:
        if isinstance(item, tuple) and len(item) == 2 and item[0] in ("user", "group"):
            kind, who = item
        elif isinstance(item, str) and item.startswith(("user:", "group:")):
            kind, who = item.split(":", 1)
        elif isinstance(item, (int, str)) and not isinstance(item, bool):
            kind, who = "user", item
        else:
            raise TypeError(f"trust takes a uid, a user name, 'group:NAME', "
                            f"('group', gid) or a list of those, not {item!r}")
        if isinstance(who, bool) or not isinstance(who, (int, str)):
            raise TypeError(f"trust takes a uid, a user name, 'group:NAME', "
                            f"('group', gid) or a list of those, not {item!r}")
        (uids if kind == "user" else gids).add(_uid_of(who) if kind == "user" else _gid_of(who))
    return uids, gids


def check_trusted(st: os.stat_result, path: str, *, trust: object = None,
                  what: str = "arena") -> None:
    """PermissionError (naming the failed check) unless ``st`` describes a
    regular file we may trust: owned by the effective uid, root or a trusted
    uid, and not writable by group (unless its group is trusted) or others."""
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else
                "a FIFO" if stat.S_ISFIFO(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
                "not a regular file")
        raise PermissionError(errno.EPERM, f"{what} {path!r} is {kind}, not a regular file",
                              path)
    uids, gids = _parse_trust(trust)
    euid = os.geteuid()
    if st.st_uid not in (euid, 0) and st.st_uid not in uids:
        raise PermissionError(errno.EPERM, f"{what} {path!r} is owned by uid {st.st_uid}, "
                              f"not by this process's uid {euid} or root (pass trust= to "
                              f"accept another owner)", path)
    if st.st_mode & stat.S_IWOTH:
        raise PermissionError(errno.EPERM, f"{what} {path!r} is writable by every user "
                              f"(mode {stat.S_IMODE(st.st_mode):#o})", path)
    if st.st_mode & stat.S_IWGRP and st.st_gid not in gids:
        raise PermissionError(errno.EPERM, f"{what} {path!r} is writable by group "
                              f"{st.st_gid} (mode {stat.S_IMODE(st.st_mode):#o}; pass "
                              f"trust='group:NAME' to accept it)", path)


def open_checked(name: str | os.PathLike, *, readonly: bool = False, trust: object = None,
                 what: str = "arena") -> tuple[str, int, os.stat_result]:
    """Open an existing shared file safely; returns (path, fd, stat).

    The file is first opened with O_PATH | O_NOFOLLOW (which neither reads
    nor writes, so a FIFO or device is never opened for real), checked by
    check_trusted(), then reopened with the access wanted.  The caller owns
    the returned descriptor.
    """
    path = path_for(name, what)
    try:
        probe = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"no {what} {path!r}", path) from None
    except OSError as e:
        raise OSError(e.errno, f"cannot open {what} {path!r}: {os.strerror(e.errno)}",
                      path) from None
    try:
        st = os.fstat(probe)
        if stat.S_ISLNK(st.st_mode):
            raise PermissionError(errno.ELOOP, f"{what} {path!r} is a symbolic link; "
                                  f"open its target by name if you trust it", path)
        check_trusted(st, path, trust=trust, what=what)
        access = os.O_RDONLY if readonly else os.O_RDWR
        try:
            fd = os.open(f"/proc/self/fd/{probe}", access | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            raise OSError(e.errno, f"cannot open {what} {path!r} "
                          f"{'read-only' if readonly else 'for writing'}: "
                          f"{os.strerror(e.errno)}", path) from None
    finally:
        os.close(probe)
    again = os.fstat(fd)
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise PermissionError(errno.EPERM, f"{what} {path!r} changed while it was opened",
                              path)
    return path, fd, again


def open_mapped(name: str | os.PathLike, parse: Callable[[bytes, int], object], *,
                header_size: int, readonly: bool = False, trust: object = None,
                what: str = "arena") -> tuple[str, mmap.mmap, object]:
    """open_checked(), then validate: ``parse(head, file_size)`` gets the
    first ``header_size`` bytes and returns the layout (raising on a damaged
    or foreign file) before anything is mapped; the mapping covers the
    layout's ``total_size``.  Returns (path, mapping, layout)."""
    path, fd, st = open_checked(name, readonly=readonly, trust=trust, what=what)
    try:
        layout = parse(os.pread(fd, header_size, 0), st.st_size)
        mapping = map_fd(fd, layout.total_size, readonly=readonly)  # type: ignore[attr-defined]
    finally:
        os.close(fd)
    return path, mapping, layout


def map_fd(fd: int, size: int, *, readonly: bool = False) -> mmap.mmap:
    """A shared mapping of ``size`` bytes of ``fd``, read-only if asked."""
    if readonly:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


class HeaderFormat:
    """The common frame of every shared file's header: an 8-byte magic, a
    32-bit version, the structure's own fields, and a CRC32 of all that.

    ``fields`` is a struct format (little-endian, without the leading '<')
    of the structure's own fields.  unpack() validates magic, version and
    checksum and raises ArenaFormatError naming ``what`` and the problem.
    """

    def __init__(self, magic: bytes, version: int, fields: str, what: str):
        if len(magic) != 8:
            raise ValueError("the magic number is 8 bytes")
        self.magic = magic
        self.version = version
        self.what = what
        self._struct = struct.Struct("<8sI" + fields)
        self.size = self._struct.size + 4

    def pack(self, *values: object) -> bytes:
        body = self._struct.pack(self.magic, self.version, *values)
        return body + struct.pack("<I", zlib.crc32(body))

    def unpack(self, data: bytes, file_size: int) -> tuple:
        err = _core.ArenaFormatError
        if file_size == 0:
            raise err(f"not an rseq {self.what}: the file is empty")
        if len(data) < self.size or file_size < self.size:
            if data[:len(self.magic)] != self.magic[:len(data)] or not data:
                raise err(f"not an rseq {self.what} (too short, and no {self.what} magic)")
            raise err(f"truncated {self.what}: {file_size} bytes, its header alone takes "
                      f"{self.size}")
        magic, version = struct.unpack_from("<8sI", data)
        if magic != self.magic:
            raise err(f"not an rseq {self.what} (bad magic number)")
        if version != self.version:
            raise err(f"{self.what} version {version}: this rseq reads version {self.version}")
        body = data[:self._struct.size]
        (checksum,) = struct.unpack_from("<I", data, self._struct.size)
        if zlib.crc32(body) != checksum:
            raise err(f"{self.what} header checksum mismatch: the header is corrupt")
        return self._struct.unpack(body)[2:]
