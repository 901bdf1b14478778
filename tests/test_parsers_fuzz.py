"""Property tests: the text parsers fail only with ValueError, the resolvers never fail at all.

The resolvers read whatever the kernel (or a broken container runtime) left in /proc and
/sys/fs/cgroup; a library imported at start-up must not take its host down over a bad file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from threadbudget import detect_budget
from threadbudget._cgroup import (
    Mount,
    parse_cfs,
    parse_cpu_list,
    parse_cpu_max,
    parse_mountinfo,
    parse_proc_cgroup,
    read_cgroup_limits,
    unescape_mount_field,
)

FAST = settings(max_examples=300, deadline=None)
SLOW = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Text that looks like cgroup files often enough to reach the deeper branches.
CGROUP_ALPHABET = " \t\n0123456789-max,:/\\.name=cgroup2"
cgroupish = st.text(alphabet=CGROUP_ALPHABET, max_size=60)
any_text = st.one_of(st.text(max_size=200), cgroupish)


# ------------------------------------------------------------------ the parsers never misbehave


@FAST
@given(any_text)
def test_parse_mountinfo_never_raises(text: str) -> None:
    mounts, problems = parse_mountinfo(text)
    assert all(isinstance(mount, Mount) for mount in mounts)
    assert all(mount.fstype in ("cgroup", "cgroup2") for mount in mounts)
    assert all(isinstance(problem, str) for problem in problems)


@FAST
@given(any_text)
def test_parse_proc_cgroup_never_raises(text: str) -> None:
    membership, problems = parse_proc_cgroup(text)
    assert membership.v2 is None or membership.v2.startswith("/")
    assert all(path.startswith("/") for path in membership.v1.values())
    assert all(isinstance(problem, str) for problem in problems)


@FAST
@given(any_text)
def test_parse_cpu_max_returns_a_positive_quota_or_raises_value_error(text: str) -> None:
    try:
        quota = parse_cpu_max(text)
    except ValueError:
        return
    assert quota is None or quota > 0


@FAST
@given(any_text, any_text)
def test_parse_cfs_returns_a_positive_quota_or_raises_value_error(
    quota_text: str, period_text: str
) -> None:
    try:
        quota = parse_cfs(quota_text, period_text)
    except ValueError:
        return
    assert quota is None or quota > 0


@FAST
@given(any_text)
def test_parse_cpu_list_returns_cpus_or_raises_value_error(text: str) -> None:
    try:
        cpus = parse_cpu_list(text)
    except ValueError:
        return
    assert all(isinstance(cpu, int) and 0 <= cpu <= 1 << 16 for cpu in cpus)


@FAST
@given(st.text(alphabet=st.sampled_from("\\0123456789abc \t"), max_size=40) | st.text(max_size=40))
def test_unescape_mount_field_returns_text_or_raises_value_error(text: str) -> None:
    try:
        result = unescape_mount_field(text)
    except ValueError:
        return
    assert isinstance(result, str)
    assert len(result) <= len(text)


# ------------------------------------------------------------------ round trips


def _format_ranges(cpus: set[int]) -> str:
    ordered = sorted(cpus)
    chunks: list[str] = []
    index = 0
    while index < len(ordered):
        end = index
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        low, high = ordered[index], ordered[end]
        chunks.append(str(low) if low == high else f"{low}-{high}")
        index = end + 1
    return ",".join(chunks)


@FAST
@given(st.sets(st.integers(min_value=0, max_value=4096), max_size=64), st.sampled_from(["", "\n"]))
def test_cpu_list_round_trip(cpus: set[int], ending: str) -> None:
    assert parse_cpu_list(_format_ranges(cpus) + ending) == frozenset(cpus)


@FAST
@given(
    st.lists(
        st.tuples(st.integers(0, 512), st.integers(0, 64)).map(lambda t: (t[0], t[0] + t[1])),
        min_size=1,
        max_size=12,
    )
)
def test_cpu_list_overlapping_unsorted_chunks_are_a_union(chunks: list[tuple[int, int]]) -> None:
    text = " , ".join(f"{low}-{high}" if high != low else str(low) for low, high in chunks)
    expected = {cpu for low, high in chunks for cpu in range(low, high + 1)}
    assert parse_cpu_list(text) == frozenset(expected)


@FAST
@given(st.integers(1, 10**15), st.integers(1, 10**12), st.sampled_from(["\n", "", " \n"]))
def test_cpu_max_quota_over_period(quota: int, period: int, ending: str) -> None:
    assert parse_cpu_max(f"{quota} {period}{ending}") == pytest.approx(quota / period)


@FAST
@given(st.integers(1, 10**15))
def test_cpu_max_one_field_uses_the_default_period(quota: int) -> None:
    assert parse_cpu_max(f"{quota}\n") == pytest.approx(quota / 100_000)


@FAST
@given(st.integers(1, 10**12))
def test_cpu_max_max_is_no_limit(period: int) -> None:
    assert parse_cpu_max(f"max {period}\n") is None


@FAST
@given(st.integers(-(10**12), 0), st.integers(-(10**12), 10**12))
def test_cpu_max_non_positive_quota_is_rejected(quota: int, period: int) -> None:
    with pytest.raises(ValueError, match="quota"):
        parse_cpu_max(f"{quota} {period}")


@FAST
@given(st.integers(1, 10**15), st.integers(1, 10**12))
def test_cfs_quota_over_period(quota: int, period: int) -> None:
    assert parse_cfs(f"{quota}\n", f"{period}\n") == pytest.approx(quota / period)


@FAST
@given(st.integers(-(10**12), 10**12))
def test_cfs_minus_one_is_no_limit_whatever_the_period(period: int) -> None:
    assert parse_cfs("-1\n", f"{period}\n") is None


@FAST
@given(st.integers(1, 10**9), st.integers(-(10**9), 0))
def test_cfs_non_positive_period_is_rejected(quota: int, period: int) -> None:
    with pytest.raises(ValueError, match="period"):
        parse_cfs(f"{quota}", f"{period}")


def _escape_mount_field(value: str) -> str:
    # What the kernel does in show_mountinfo(): space, tab, newline and backslash become octal.
    return "".join(f"\\{ord(char):03o}" if char in " \t\n\\" else char for char in value)


mount_path = st.lists(
    st.text(alphabet=st.characters(exclude_characters="/\x00", codec="utf-8"), min_size=1),
    min_size=0,
    max_size=4,
).map(lambda parts: "/" + "/".join(parts))


@FAST
@given(mount_path)
def test_unescape_undoes_the_kernel_escapes(path: str) -> None:
    assert unescape_mount_field(_escape_mount_field(path)) == path


@FAST
@given(
    mount_path,
    mount_path,
    st.lists(
        st.sampled_from(["shared:1", "master:7", "propagate_from:3", "unbindable"]), max_size=4
    ),
    st.sets(st.sampled_from(["cpu", "cpuacct", "cpuset", "memory", "name=systemd"]), min_size=1),
)
def test_mountinfo_line_round_trip(
    mount_point: str, root: str, optional: list[str], controllers: set[str]
) -> None:
    fields = [
        "32",
        "24",
        "0:29",
        _escape_mount_field(root),
        _escape_mount_field(mount_point),
        "rw,relatime",
        *optional,
        "-",
        "cgroup",
        "cgroup",
        ",".join(["rw", *sorted(controllers)]),
    ]
    mounts, problems = parse_mountinfo(" ".join(fields) + "\n")
    assert problems == []
    assert mounts == [
        Mount(
            mount_point=mount_point,
            root=root,
            fstype="cgroup",
            controllers=frozenset(name.removeprefix("name=") for name in controllers),
        )
    ]


@FAST
@given(
    st.integers(1, 99),
    st.sets(st.sampled_from(["cpu", "cpuacct", "cpuset", "name=systemd"]), min_size=1),
    mount_path,
    mount_path,
)
def test_proc_cgroup_round_trip(hierarchy: int, controllers: set[str], v1: str, v2: str) -> None:
    # The kernel writes these paths unescaped: only a newline, or a CR before one, is ambiguous.
    assume("\n" not in v1 + v2 and not v1.endswith("\r") and not v2.endswith("\r"))
    text = f"{hierarchy}:{','.join(sorted(controllers))}:{v1}\n0::{v2}\n"
    membership, problems = parse_proc_cgroup(text)
    assert problems == []
    assert membership.v2 == v2
    assert membership.v1 == {name.removeprefix("name="): v1 for name in controllers}


@pytest.mark.parametrize("odd", ["\r", "\x85", "\u2028", "\x0b", "\x1c", "\xa0", "\u3000"])
def test_odd_characters_in_names_do_not_split_lines_or_fields(odd: str) -> None:
    """Only newline separates lines and only space separates fields (regression)."""
    mountinfo = (
        f"50 22 0:40 / /mnt/usb{odd}stick rw,relatime shared:3 - vfat /dev/sdb1 rw\n"
        f"30 24 0:26 / /sys/fs/cgroup/x{odd}y rw shared:9 - cgroup2 cgroup2 rw\n"
    )
    mounts, problems = parse_mountinfo(mountinfo)
    assert problems == []
    assert [mount.mount_point for mount in mounts] == [f"/sys/fs/cgroup/x{odd}y"]
    membership, problems = parse_proc_cgroup(f"1:cpu:/a{odd}b\n0::/app{odd}x.service\n")
    assert problems == []
    assert membership.v2 == f"/app{odd}x.service"
    assert membership.v1 == {"cpu": f"/a{odd}b"}


def test_crlf_line_endings_are_tolerated() -> None:
    mounts, problems = parse_mountinfo("30 24 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\r\n")
    assert problems == []
    assert mounts[0].mount_point == "/sys/fs/cgroup"
    membership, problems = parse_proc_cgroup("0::/app\r\n")
    assert (membership.v2, problems) == ("/app", [])


# ------------------------------------------------------------------ whole fake roots

VALID_MOUNTINFO = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    "34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:1 - cgroup2 cgroup2 rw\n"
)
VALID_CGROUP = "3:cpuset:/app\n1:cpu:/app\n0::/app\n"

# Every file a resolver reads in the fake root, with a valid value for it.
FILES = {
    "proc/self/mountinfo": VALID_MOUNTINFO,
    "proc/self/cgroup": VALID_CGROUP,
    "sys/fs/cgroup/unified/app/cpu.max": "150000 100000\n",
    "sys/fs/cgroup/unified/cpu.max": "max 100000\n",
    "sys/fs/cgroup/unified/app/cpuset.cpus.effective": "0-1\n",
    "sys/fs/cgroup/unified/app/cpu.weight": "100\n",
    "sys/fs/cgroup/cpu/app/cpu.cfs_quota_us": "250000\n",
    "sys/fs/cgroup/cpu/app/cpu.cfs_period_us": "100000\n",
    "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n",
    "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
    "sys/fs/cgroup/cpu/app/cpu.shares": "1024\n",
    "sys/fs/cgroup/cpuset/app/cpuset.effective_cpus": "0-3\n",
    "sys/fs/cgroup/cpuset/app/cpuset.cpus": "0-3\n",
    "sys/devices/system/cpu/online": "0-3\n",
    "sys/devices/system/cpu/cpu0/topology/core_cpus_list": "0-1\n",
    "sys/devices/system/cpu/cpu1/topology/thread_siblings_list": "0-1\n",
}

# Mountinfo lines whose paths are random (escapes, '..', NUL escapes and all).
odd_mount_path = st.one_of(
    st.text(alphabet="/.a\\0401", min_size=1, max_size=20),
    st.sampled_from(
        [
            "/sys/fs/cgroup\\000x",
            "\\000",
            "/../../..",
            "/sys/fs/cgroup/unified/../../../../..",
            "relative",
            "/" + "x" * 300,
            "/sys/fs/cgroup/cpu/app/cpu.cfs_quota_us",
        ]
    ),
)
random_mount_line = st.builds(
    lambda root, point, kind: f"40 31 0:40 {root} {point} rw - {kind}",
    st.one_of(st.sampled_from(["/", "/app", "/app/", "/other"]), odd_mount_path),
    odd_mount_path,
    st.sampled_from(["cgroup2 cgroup2 rw", "cgroup cgroup rw,cpu", "cgroup cgroup rw,cpuset"]),
)
random_cgroup_line = st.builds(
    lambda hierarchy, controllers, path: f"{hierarchy}:{controllers}:{path}",
    st.sampled_from(["0", "1", "3", "x"]),
    st.sampled_from(["", "cpu", "cpuset", "cpu,cpuacct"]),
    st.text(alphabet="/.a\\0 ", max_size=20),
)

file_content = st.one_of(
    st.none(),  # the file is absent
    st.sampled_from(["", "\n", "max", "-1", "0", "-5", "0 0", "1-0", "99999999999999999999"]),
    st.text(max_size=40),
    cgroupish,
    st.binary(max_size=40),
)


@st.composite
def fake_roots(draw: st.DrawFn) -> dict[str, str | bytes | None]:
    contents: dict[str, str | bytes | None] = {}
    for path, valid in FILES.items():
        contents[path] = draw(st.one_of(st.just(valid), file_content))
    mountinfo = draw(st.lists(random_mount_line, max_size=3))
    if mountinfo and draw(st.booleans()):
        contents["proc/self/mountinfo"] = "\n".join(mountinfo)  # only odd mounts
    elif mountinfo and isinstance(contents["proc/self/mountinfo"], str):
        contents["proc/self/mountinfo"] = "\n".join([contents["proc/self/mountinfo"], *mountinfo])
    cgroup_lines = draw(st.lists(random_cgroup_line, max_size=3))
    if cgroup_lines and isinstance(contents["proc/self/cgroup"], str):
        contents["proc/self/cgroup"] = "\n".join([contents["proc/self/cgroup"], *cgroup_lines])
    return contents


def _populate(root: Path, contents: dict[str, str | bytes | None]) -> None:
    for name in ("proc", "sys"):
        shutil.rmtree(root / name, ignore_errors=True)
    for relative, content in contents.items():
        if content is None:
            continue
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        data = (
            content.encode("utf-8", errors="surrogatepass") if isinstance(content, str) else content
        )
        path.write_bytes(data)


def test_nul_escape_in_one_mount_point_does_not_hide_the_others(tmp_path: Path) -> None:
    """Regression: open() raises ValueError on a NUL; that used to abort the whole detection."""
    _populate(
        tmp_path,
        {
            "proc/self/mountinfo": (
                "30 24 0:26 / /sys/fs/cgroup\\000x rw - cgroup2 cgroup2 rw\n"
                "32 24 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
            ),
            "proc/self/cgroup": "1:cpu:/app\n0::/app\n",
            "sys/fs/cgroup/cpu/app/cpu.cfs_quota_us": "100000\n",
            "sys/fs/cgroup/cpu/app/cpu.cfs_period_us": "100000\n",
        },
    )
    limits = read_cgroup_limits(tmp_path)
    assert (limits.quota, limits.quota_path) == (1.0, "/sys/fs/cgroup/cpu/app")
    assert limits.warnings
    assert all("embedded null byte" in warning for warning in limits.warnings)


@SLOW
@given(contents=fake_roots(), affinity=st.sets(st.integers(0, 7), min_size=1))
def test_resolvers_never_raise_on_any_file_content(
    tmp_path_factory: pytest.TempPathFactory,
    contents: dict[str, str | bytes | None],
    affinity: set[int],
) -> None:
    root = tmp_path_factory.mktemp("fakeroot")
    _populate(root, contents)

    limits = read_cgroup_limits(root)
    # The last-resort handler is for bugs; no file content may reach it.
    assert not any("failed unexpectedly" in warning for warning in limits.warnings), limits
    assert limits.quota is None or limits.quota > 0
    assert limits.cpuset is None or len(limits.cpuset) > 0

    for rounding in ("floor", "ceil", "nearest"):
        budget = detect_budget(
            root=root,
            affinity=frozenset(affinity),
            rounding=rounding,
            environ={},
            emit_warnings=False,
        )
        assert 1 <= budget.budget <= len(affinity)
        assert budget.available >= 0
        assert budget.physical_cores is None or 1 <= budget.physical_cores <= len(affinity)
        assert budget.explain()


@SLOW
@given(
    quota=st.integers(1, 64 * 100_000),
    period=st.integers(1_000, 1_000_000),
    affinity=st.sets(st.integers(0, 63), min_size=1),
    version=st.sampled_from([1, 2]),
)
def test_budget_follows_quota_and_affinity(
    tmp_path_factory: pytest.TempPathFactory,
    quota: int,
    period: int,
    affinity: set[int],
    version: int,
) -> None:
    root = tmp_path_factory.mktemp("quotaroot")
    if version == 2:
        contents: dict[str, str | bytes | None] = {
            "proc/self/mountinfo": "30 24 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
            "proc/self/cgroup": "0::/app\n",
            "sys/fs/cgroup/app/cpu.max": f"{quota} {period}\n",
        }
    else:
        contents = {
            "proc/self/mountinfo": "32 24 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n",
            "proc/self/cgroup": "1:cpu:/app\n",
            "sys/fs/cgroup/cpu/app/cpu.cfs_quota_us": f"{quota}\n",
            "sys/fs/cgroup/cpu/app/cpu.cfs_period_us": f"{period}\n",
        }
    _populate(root, contents)
    cpus = quota / period
    floor = detect_budget(
        root=root, affinity=frozenset(affinity), rounding="floor", environ={}, emit_warnings=False
    )
    ceil = detect_budget(
        root=root, affinity=frozenset(affinity), rounding="ceil", environ={}, emit_warnings=False
    )
    assert floor.quota == pytest.approx(cpus)
    assert floor.quota_version == version
    assert floor.warnings == ()
    assert 1 <= floor.budget <= ceil.budget <= len(affinity)
    assert ceil.budget - floor.budget <= 1
    # The floor never overruns the quota unless the quota is below one CPU.
    assert floor.budget <= max(1, cpus + 1e-6)
    # The ceil never wastes a whole CPU of quota that the affinity mask allows.
    assert ceil.budget >= min(cpus, len(affinity)) - 1e-6
