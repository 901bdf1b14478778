"""Read the CPU limits that cgroups (v1, v2 and hybrid hosts) put on a process.

Every function here is pure over a *root* directory: the real system is ``Path("/")`` and the
tests point it at checked-in fixture trees. Text parsers raise :class:`ValueError` on garbage;
the resolvers that read files never raise, they turn every problem into a warning string that
names the file and the value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

__all__ = [
    "CgroupLimits",
    "Mount",
    "ProcCgroup",
    "parse_cfs",
    "parse_cpu_list",
    "parse_cpu_max",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "read_cgroup_limits",
    "unescape_mount_field",
]

# Files larger than this are not cgroup files; refusing them keeps a corrupt tree from
# costing memory or time.
_MAX_FILE_BYTES = 1 << 20
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One cgroup line of ``/proc/<pid>/mountinfo``."""

    mount_point: str
    root: str
    fstype: str
    controllers: frozenset[str]


@dataclass(frozen=True)
class ProcCgroup:
    """``/proc/<pid>/cgroup``: v1 controller paths and the v2 (unified) path."""

    v1: dict[str, str] = field(default_factory=dict)
    v2: str | None = None


@dataclass(frozen=True)
class CgroupLimits:
    """What the cgroup hierarchy says about CPU, with provenance.

    ``quota`` is in CPUs (``1.5`` for ``150000 100000``); ``None`` means no limit was found,
    which is a normal answer, not an error.
    """

    quota: float | None = None
    quota_path: str | None = None
    quota_version: int | None = None
    cpuset: frozenset[int] | None = None
    cpuset_path: str | None = None
    shares: int | None = None
    shares_path: str | None = None
    files_read: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def unescape_mount_field(value: str) -> str:
    """Undo the kernel's octal escapes in mountinfo paths (``\\040`` is a space)."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), value)


def _lines(text: str) -> list[str]:
    r"""Split kernel output at ``\n`` only; tolerate CRLF.

    ``str.splitlines`` also splits at ``\r``, ``\x85``, ``\u2028`` and others, which the kernel
    writes unescaped when they occur in mount and cgroup names.
    """
    return [line.removesuffix("\r") for line in text.split("\n")]


def parse_mountinfo(text: str) -> tuple[list[Mount], list[str]]:
    """Return the cgroup mounts in *text* and a warning for each line that could not be read.

    A mountinfo line has a variable number of optional fields before a lone ``-``; the fields
    after it are filesystem type, source and super options (where v1 names its controllers).
    """
    mounts: list[Mount] = []
    problems: list[str] = []
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        # The kernel separates fields with single spaces and escapes only space, tab, newline
        # and backslash in paths: any other character (\r, \x85, \xa0...) belongs to a path.
        fields = [item for item in line.split(" ") if item]
        try:
            separator = fields.index("-", 6)
        except ValueError:
            problems.append(f"line {number} has no ' - ' separator: {line[:120]!r}")
            continue
        if len(fields) < separator + 3:
            problems.append(f"line {number} ends before its super options: {line[:120]!r}")
            continue
        fstype = fields[separator + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        super_options = fields[separator + 3].split(",")
        controllers = frozenset(
            option.removeprefix("name=")
            for option in super_options
            if (option not in ("rw", "ro") and "=" not in option) or option.startswith("name=")
        )
        mounts.append(
            Mount(
                mount_point=unescape_mount_field(fields[4]),
                root=unescape_mount_field(fields[3]),
                fstype=fstype,
                controllers=controllers if fstype == "cgroup" else frozenset(),
            )
        )
    return mounts, problems


def parse_proc_cgroup(text: str) -> tuple[ProcCgroup, list[str]]:
    """Parse ``/proc/<pid>/cgroup`` lines ``ID:CONTROLLERS:PATH``.

    ``0::/path`` is the v2 path; other lines map each of their comma-separated v1 controllers
    (``cpu,cpuacct``) to the path.
    """
    v1: dict[str, str] = {}
    v2: str | None = None
    problems: list[str] = []
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            problems.append(f"line {number} is not ID:CONTROLLERS:/PATH: {line[:120]!r}")
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
            continue
        for controller in controllers.split(","):
            if controller:
                v1[controller.removeprefix("name=")] = path
    return ProcCgroup(v1=v1, v2=v2), problems


def _parse_int(token: str, what: str) -> int:
    if not re.fullmatch(r"-?[0-9]{1,19}", token):
        raise ValueError(f"{what} is not an integer: {token!r}")
    return int(token)


def parse_cpu_max(text: str) -> float | None:
    """Parse v2 ``cpu.max`` (``"150000 100000"`` -> 1.5; ``"max 100000"`` -> ``None``)."""
    tokens = text.split()
    if not tokens or len(tokens) > 2:
        raise ValueError(f"expected 'QUOTA [PERIOD]', got {text.strip()[:80]!r}")
    if tokens[0] == "max":
        if len(tokens) == 2:
            _positive_period(tokens[1])
        return None
    quota = _parse_int(tokens[0], "quota")
    if quota <= 0:
        raise ValueError(f"quota must be positive or 'max', got {quota}")
    # The kernel's default period is 100 ms; a one-field file means that default.
    period = _positive_period(tokens[1]) if len(tokens) == 2 else 100_000
    return quota / period


def _positive_period(token: str) -> int:
    period = _parse_int(token, "period")
    if period <= 0:
        raise ValueError(f"period must be positive, got {period}")
    return period


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """Parse v1 ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us``; ``-1`` quota means no limit."""
    quota_tokens = quota_text.split()
    period_tokens = period_text.split()
    if len(quota_tokens) != 1:
        raise ValueError(
            f"cpu.cfs_quota_us should hold one integer, got {quota_text.strip()[:80]!r}"
        )
    if len(period_tokens) != 1:
        raise ValueError(
            f"cpu.cfs_period_us should hold one integer, got {period_text.strip()[:80]!r}"
        )
    quota = _parse_int(quota_tokens[0], "cpu.cfs_quota_us")
    if quota == -1:
        return None
    if quota <= 0:
        raise ValueError(f"cpu.cfs_quota_us must be -1 or positive, got {quota}")
    return quota / _positive_period(period_tokens[0])


def parse_cpu_list(text: str, *, max_cpu: int = 1 << 16) -> frozenset[int]:
    """Parse a kernel CPU list such as ``"0-3,8,10-11"``; an empty file is the empty set."""
    cpus: set[int] = set()
    body = text.strip()
    if not body:
        return frozenset()
    for raw_chunk in body.split(","):
        chunk = raw_chunk.strip()
        match = re.fullmatch(r"([0-9]{1,6})(?:-([0-9]{1,6}))?", chunk)
        if match is None:
            raise ValueError(f"not a CPU list item: {chunk[:40]!r}")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise ValueError(f"descending CPU range: {chunk!r}")
        if high > max_cpu:
            raise ValueError(f"CPU number {high} is beyond {max_cpu}")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


class _Reader:
    """Reads files below *root*, remembering each path read and each problem met."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files_read: list[str] = []
        self.warnings: list[str] = []

    def host_path(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def read(self, path: str) -> str | None:
        """Return the text of *path* (absolute, inside root) or ``None`` when it is absent."""
        full = self.host_path(path)
        try:
            with full.open("rb") as handle:
                data = handle.read(_MAX_FILE_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            self.warnings.append(f"cannot read {path}: {error.strerror or error}")
            return None
        except ValueError as error:  # a NUL in the path (a ``\000`` escape in mountinfo)
            self.warnings.append(f"cannot read {path!r}: {error}")
            return None
        self.files_read.append(path)
        if len(data) > _MAX_FILE_BYTES:
            self.warnings.append(f"{path} is larger than {_MAX_FILE_BYTES} bytes; ignored")
            return None
        return data.decode("utf-8", errors="replace")


def _cgroup_dir(mount: Mount, cgroup_path: str, reader: _Reader) -> str:
    """Translate a path from ``/proc/self/cgroup`` into a directory under the mount point."""
    root = mount.root.rstrip("/") or "/"
    if root == "/":
        relative = cgroup_path
    elif cgroup_path == root or cgroup_path.startswith(root + "/"):
        relative = cgroup_path[len(root) :]
    else:
        # Seen with cgroup namespaces and bind mounts: the process's path is not under the
        # mount's root, so the mount point itself is the closest directory we can see.
        reader.warnings.append(
            f"cgroup path {cgroup_path!r} lies outside the root {mount.root!r} of the mount at "
            f"{mount.mount_point}; reading limits from the mount point"
        )
        relative = "/"
    parts = [part for part in PurePosixPath(relative).parts if part not in ("/", ".")]
    if ".." in parts:
        reader.warnings.append(
            f"cgroup path {cgroup_path!r} leaves its namespace; reading limits from "
            f"{mount.mount_point}"
        )
        parts = []
    return str(PurePosixPath(mount.mount_point, *parts))


def _ancestors(directory: str, mount_point: str) -> list[str]:
    """*directory* and each parent up to and including *mount_point*, leaf first."""
    chain = [directory]
    current = PurePosixPath(directory)
    stop = PurePosixPath(mount_point)
    while current != stop and stop in current.parents:
        current = current.parent
        chain.append(str(current))
    return chain


def _pick_mount(mounts: list[Mount], cgroup_path: str) -> Mount:
    """Among mounts of one hierarchy, prefer the one whose root holds the cgroup path."""

    def fit(mount: Mount) -> int:
        root = mount.root.rstrip("/")
        if not root or cgroup_path == root or cgroup_path.startswith(root + "/"):
            return len(root)
        return -1

    return max(mounts, key=fit)


@dataclass
class _Found:
    quota: float | None = None
    quota_path: str | None = None
    quota_version: int | None = None

    def offer(self, quota: float, path: str, version: int) -> None:
        if self.quota is None or quota < self.quota:
            self.quota, self.quota_path, self.quota_version = quota, path, version


def _scan_v2_quota(directory: str, mount_point: str, reader: _Reader, found: _Found) -> None:
    for path in _ancestors(directory, mount_point):
        text = reader.read(f"{path}/cpu.max")
        if text is None:
            continue
        try:
            quota = parse_cpu_max(text)
        except ValueError as error:
            reader.warnings.append(f"{path}/cpu.max: {error}; ignored")
            continue
        if quota is not None:
            found.offer(quota, path, 2)


def _scan_v1_quota(directory: str, mount_point: str, reader: _Reader, found: _Found) -> None:
    for path in _ancestors(directory, mount_point):
        quota_text = reader.read(f"{path}/cpu.cfs_quota_us")
        if quota_text is None:
            continue
        period_text = reader.read(f"{path}/cpu.cfs_period_us")
        if period_text is None:
            reader.warnings.append(f"{path}/cpu.cfs_period_us is missing beside its quota; ignored")
            continue
        try:
            quota = parse_cfs(quota_text, period_text)
        except ValueError as error:
            reader.warnings.append(f"{path}: {error}; ignored")
            continue
        if quota is not None:
            found.offer(quota, path, 1)


def _read_cpuset(
    directory: str, mount_point: str, names: tuple[str, ...], reader: _Reader
) -> tuple[frozenset[int] | None, str | None]:
    """The nearest non-empty effective CPU list, walking up from the leaf."""
    for path in _ancestors(directory, mount_point):
        for name in names:
            text = reader.read(f"{path}/{name}")
            if text is None:
                continue
            try:
                cpus = parse_cpu_list(text)
            except ValueError as error:
                reader.warnings.append(f"{path}/{name}: {error}; ignored")
                continue
            if cpus:
                return cpus, f"{path}/{name}"
    return None, None


def _read_shares(path: str, name: str, reader: _Reader) -> int | None:
    text = reader.read(f"{path}/{name}")
    if text is None:
        return None
    try:
        return _parse_int(text.strip(), name)
    except ValueError as error:
        reader.warnings.append(f"{path}/{name}: {error}; ignored")
        return None


def read_cgroup_limits(root: Path | str = "/", pid: str = "self") -> CgroupLimits:
    """Find the CPU quota, cpuset and shares that apply to *pid*, seen from *root*.

    Both hierarchies are consulted, so hybrid hosts (v1 controllers beside a v2 mount) work:
    every ``cpu.max`` and ``cpu.cfs_quota_us`` on the path from the process's cgroup up to its
    mount is read, and the lowest quota wins, wherever it sits. Never raises.
    """
    reader = _Reader(Path(root))
    try:
        return _read_cgroup_limits(reader, pid)
    except Exception as error:  # a last resort: detection must never take the host down
        reader.warnings.append(f"cgroup detection failed unexpectedly: {error!r}")
        return CgroupLimits(files_read=tuple(reader.files_read), warnings=tuple(reader.warnings))


def _read_cgroup_limits(reader: _Reader, pid: str) -> CgroupLimits:
    mountinfo_path = f"/proc/{pid}/mountinfo"
    cgroup_path = f"/proc/{pid}/cgroup"
    mountinfo_text = reader.read(mountinfo_path)
    cgroup_text = reader.read(cgroup_path)
    if mountinfo_text is None or cgroup_text is None:
        missing = mountinfo_path if mountinfo_text is None else cgroup_path
        return CgroupLimits(
            files_read=tuple(reader.files_read),
            warnings=tuple(reader.warnings),
            notes=(f"{missing} not found: no cgroup limits can be read",),
        )

    mounts, problems = parse_mountinfo(mountinfo_text)
    reader.warnings.extend(f"{mountinfo_path}: {problem}" for problem in problems)
    membership, problems = parse_proc_cgroup(cgroup_text)
    reader.warnings.extend(f"{cgroup_path}: {problem}" for problem in problems)

    found = _Found()
    cpuset: frozenset[int] | None = None
    cpuset_file: str | None = None
    shares: int | None = None
    shares_file: str | None = None

    v2_mounts = [mount for mount in mounts if mount.fstype == "cgroup2"]
    if membership.v2 is not None and v2_mounts:
        mount = _pick_mount(v2_mounts, membership.v2)
        directory = _cgroup_dir(mount, membership.v2, reader)
        _scan_v2_quota(directory, mount.mount_point, reader, found)
        cpuset, cpuset_file = _read_cpuset(
            directory, mount.mount_point, ("cpuset.cpus.effective",), reader
        )
        weight = _read_shares(directory, "cpu.weight", reader)
        if weight is not None:
            shares, shares_file = weight, f"{directory}/cpu.weight"

    def v1_dir(controller: str) -> tuple[str, str] | None:
        path = membership.v1.get(controller)
        candidates = [m for m in mounts if m.fstype == "cgroup" and controller in m.controllers]
        if path is None or not candidates:
            return None
        mount = _pick_mount(candidates, path)
        return _cgroup_dir(mount, path, reader), mount.mount_point

    cpu = v1_dir("cpu")
    if cpu is not None:
        _scan_v1_quota(cpu[0], cpu[1], reader, found)
        v1_shares = _read_shares(cpu[0], "cpu.shares", reader)
        if v1_shares is not None and shares is None:
            shares, shares_file = v1_shares, f"{cpu[0]}/cpu.shares"
    v1_cpuset = v1_dir("cpuset")
    if v1_cpuset is not None and cpuset is None:
        cpuset, cpuset_file = _read_cpuset(
            v1_cpuset[0], v1_cpuset[1], ("cpuset.effective_cpus", "cpuset.cpus"), reader
        )

    notes = () if mounts else (f"{mountinfo_path} lists no cgroup mount: no cgroup limits apply",)
    return CgroupLimits(
        quota=found.quota,
        quota_path=found.quota_path,
        quota_version=found.quota_version,
        cpuset=cpuset,
        cpuset_path=cpuset_file,
        shares=shares,
        shares_path=shares_file,
        files_read=tuple(reader.files_read),
        warnings=tuple(reader.warnings),
        notes=notes,
    )
