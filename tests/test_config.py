"""Config: sizes, layouts, and every environment variable from_env reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import dynblock
from dynblock import BlockManager, Config, DiskStorage, EnvError, HostStorage, KvLayout


def test_layout_computes_block_size() -> None:
    # Llama-3-8B-like: 32 layers, K and V, 512 tokens, 8 kv heads x 128 dims, bf16
    lay = KvLayout(num_layers=32, outer_dim=2, page_size=512, inner_dim=8 * 128, dtype="bfloat16")
    assert lay.block_size == 64 << 20
    c = Config(layout=lay, host_blocks=4)
    assert c.block_size == 64 << 20 and c.host_bytes == 4 * (64 << 20)
    mla = KvLayout(num_layers=2, outer_dim=1, page_size=16, inner_dim=576, dtype="float8_e4m3fn")
    assert mla.block_size == 2 * 16 * 576
    assert KvLayout(1, 2, 4, 8, dtype="float32").block_size == 256
    # one block per layer: the depth leaves the block size, not the identity
    assert KvLayout(32, 2, 512, 8 * 128, dtype="bfloat16", per_layer=True).block_size == 2 << 20
    with pytest.raises(TypeError, match="per_layer"):
        KvLayout(1, 2, 4, 8, per_layer="yes")  # type: ignore[arg-type]


def test_bytes_round_down_to_blocks_and_repr_shows_resolved_values(tmp_path) -> None:
    c = Config(block_size=1000, host_bytes=4500, disk_bytes=10_999, disk_dir=str(tmp_path))
    assert c.host_blocks == 4 and c.disk_blocks == 10
    assert c.host_bytes == 4000 and c.disk_bytes == 10_000
    r = repr(c)
    assert "host_blocks=4" in r and "disk_blocks=10" in r and "block_size=1000" in r


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(), ValueError, "block_size"),
        (dict(block_size=0, host_blocks=1), ValueError, "block_size"),
        (dict(block_size=4096), ValueError, "both tiers are empty"),
        (dict(block_size=4096, host_blocks=-1), ValueError, "host_blocks"),
        (dict(block_size=4096, host_blocks=1.5), TypeError, "host_blocks"),
        (dict(block_size=4096, host_blocks=2, host_bytes=4096), ValueError, "disagree"),
        (dict(block_size=4096, host_blocks=1, o_direct="maybe"), ValueError, "o_direct"),
        (dict(block_size=4096, host_blocks=1, pin="always"), ValueError, "pin"),
        (dict(block_size=4096, host_blocks=1, numa_node=-2), ValueError, "numa_node"),
        (dict(block_size=4096, host_blocks=1, io_depth=0), ValueError, "io_depth"),
        (dict(block_size=4096, host_blocks=1, host_eviction="lfu"), ValueError, "host_eviction"),
        (dict(block_size=4096, disk_blocks=1, disk_eviction="arc"), ValueError, "disk_eviction"),
        (dict(block_size=100, layout=KvLayout(1, 2, 4, 8), host_blocks=1), ValueError, "disagrees"),
    ],
)
def test_bad_configs(kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        Config(**kwargs)


def test_bad_layouts() -> None:
    with pytest.raises(ValueError, match="outer_dim"):
        KvLayout(1, 3, 4, 8)
    with pytest.raises(ValueError, match="num_layers"):
        KvLayout(0, 2, 4, 8)
    with pytest.raises(ValueError, match="dtype"):
        KvLayout(1, 2, 4, 8, dtype="float13")


def test_from_env_reads_dynblock_names() -> None:
    env = {
        "DYNBLOCK_BLOCK_SIZE": "65536",
        "DYNBLOCK_HOST_BLOCKS": "100",
        "DYNBLOCK_DISK_BYTES": "6553600",
        "DYNBLOCK_DISK_DIR": "/mnt/nvme",
        "DYNBLOCK_DISABLE_O_DIRECT": "yes",
        "DYNBLOCK_NUMA_NODE": "1",
        "DYNBLOCK_GPU": "3",
        "DYNBLOCK_PIN": "off",
        "DYNBLOCK_IO_DEPTH": "32",
        "DYNBLOCK_WORKER_NICE": "12",
    }
    c = Config.from_env(env)
    assert c.worker_nice == 12 and Config(block_size=1, host_blocks=1).worker_nice == 5
    assert (c.block_size, c.host_blocks, c.disk_blocks) == (65536, 100, 100)
    assert c.disk_dir == "/mnt/nvme" and c.o_direct is False
    assert c.numa_node == 1 and c.gpu == 3 and c.pin is False and c.io_depth == 32
    assert Config.from_env({**env, "DYNBLOCK_NUMA_NODE": "auto"}).numa_node == "auto"
    assert (c.host_eviction, c.disk_eviction) == ("lru", "lru")
    c = Config.from_env({**env, "DYNBLOCK_HOST_EVICTION": "s3fifo", "DYNBLOCK_DISK_EVICTION": "s3fifo"})
    assert (c.host_eviction, c.disk_eviction) == ("s3fifo", "s3fifo")


def test_from_env_reads_dynamo_names() -> None:
    env = {
        "DYN_KVBM_CPU_CACHE_GB": "0.5",  # decimal GB: 500,000,000 bytes
        "DYN_KVBM_DISK_CACHE_GB": "2",
        "DYN_KVBM_DISK_CACHE_DIR": "/scratch/kv",
        "DYN_KVBM_DISK_DISABLE_O_DIRECT": "false",  # false means false
        "DYN_KVBM_DISK_ZEROFILL_FALLBACK": "false",
        "DYN_MEMORY_DISABLE_NUMA": "1",
    }
    c = Config.from_env(env, block_size=1 << 20)
    assert c.host_blocks == 500_000_000 // (1 << 20) == 476
    assert c.disk_blocks == 2_000_000_000 // (1 << 20) == 1907
    assert c.disk_dir == "/scratch/kv" and c.o_direct is True
    assert c.preallocate == "sparse-fallback" and c.numa_node is None
    assert Config.from_env({**env, "DYN_KVBM_DISK_ZEROFILL_FALLBACK": "1"}, block_size=4096).preallocate == "auto"
    over = Config.from_env({**env, "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "7",
                            "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "9"}, block_size=4096)
    assert over.host_blocks == 7 and over.disk_blocks == 9


def test_dynblock_names_win_and_overrides_win_over_both() -> None:
    env = {"DYNBLOCK_BLOCK_SIZE": "4096", "DYNBLOCK_HOST_BLOCKS": "5",
           "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "7",
           "DYNBLOCK_DISABLE_O_DIRECT": "0", "DYN_KVBM_DISK_DISABLE_O_DIRECT": "1",
           "DYNBLOCK_DISK_DIR": "/a", "DYN_KVBM_DISK_CACHE_DIR": "/b", "DYNBLOCK_DISK_BLOCKS": "3"}
    c = Config.from_env(env)
    assert c.host_blocks == 5 and c.o_direct is True and c.disk_dir == "/a"
    c = Config.from_env(env, host_bytes=4096 * 9, disk_dir="/c")
    assert c.host_blocks == 9 and c.disk_dir == "/c"


@pytest.mark.parametrize(
    "var,value,match",
    [
        ("DYNBLOCK_BLOCK_SIZE", "2MiB", "whole number"),
        ("DYNBLOCK_BLOCK_SIZE", "0", "between 1 and"),  # the setting's own bounds and message
        ("DYNBLOCK_HOST_BLOCKS", "-3", ">= 0"),
        ("DYN_KVBM_CPU_CACHE_GB", "lots", "decimal number"),
        ("DYN_KVBM_DISK_CACHE_GB", "-1", ">= 0"),
        ("DYN_KVBM_DISK_CACHE_GB", "nan", "not a number"),
        ("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "1e3", "whole number"),
        ("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "x", "whole number"),
        ("DYN_KVBM_DISK_CACHE_DIR", "  ", "empty"),
        ("DYN_KVBM_DISK_DISABLE_O_DIRECT", "disabled", "1/true/yes/on"),
        ("DYN_KVBM_DISK_ZEROFILL_FALLBACK", "2", "1/true/yes/on"),
        ("DYN_MEMORY_DISABLE_NUMA", "", "1/true/yes/on"),
        ("DYNBLOCK_DISABLE_NUMA", "nope", "1/true/yes/on"),
        ("DYNBLOCK_NUMA_NODE", "first", "whole number"),
        ("DYNBLOCK_PIN", "sometimes", "1/true/yes/on"),
        ("DYNBLOCK_IO_DEPTH", "0", "between 1 and 1024"),
        ("DYNBLOCK_REMOTE_TIMEOUT_MS", "0", "between 1 and"),
        ("DYNBLOCK_REMOTE_WRITE", "later", "'async', 'sync' or 'off'"),
        ("DYNBLOCK_DURABILITY", "always", "'process' or 'sync'"),
        ("DYNBLOCK_WORKER_NICE", "20", "between 0 and 19"),
        ("DYNBLOCK_HOST_EVICTION", "arc", "'lru' or 's3fifo'"),
        ("DYNBLOCK_DISK_EVICTION", "s3-fifo", "'lru' or 's3fifo'"),
    ],
)
def test_from_env_rejects_invalid_values_naming_the_variable(var, value, match) -> None:
    env = {"DYNBLOCK_BLOCK_SIZE": "4096", "DYNBLOCK_HOST_BLOCKS": "1", var: value}
    with pytest.raises(EnvError, match=var) as ei:
        Config.from_env(env)
    assert match in str(ei.value)


def test_from_env_without_a_block_size() -> None:
    with pytest.raises(EnvError, match="DYNBLOCK_BLOCK_SIZE"):
        Config.from_env({"DYNBLOCK_HOST_BLOCKS": "1"})


def test_replace_re_resolves_sizes() -> None:
    c = Config(block_size=4096, host_blocks=4)
    d = c.replace(host_bytes=4096 * 10, block_size=4096)
    assert d.host_blocks == 10 and c.host_blocks == 4


def test_remote_settings_from_env_and_checks() -> None:
    env = {"DYNBLOCK_BLOCK_SIZE": "4096", "DYNBLOCK_HOST_BLOCKS": "1",
           "DYNBLOCK_REMOTE_URL": " redis://bob:hunter2@10.0.0.5:6380/1 ",
           "DYNBLOCK_REMOTE_PREFIX": "fleet", "DYNBLOCK_REMOTE_TTL_S": "3600",
           "DYNBLOCK_REMOTE_TIMEOUT_MS": "150", "DYNBLOCK_REMOTE_WRITE": "sync",
           "DYNBLOCK_REMOTE_CA_FILE": "/etc/ca.pem"}
    c = Config.from_env(env)
    assert c.remote == "redis://bob:hunter2@10.0.0.5:6380/1" and c.remote_prefix == "fleet"
    assert (c.remote_ttl_s, c.remote_timeout_ms, c.remote_write) == (3600, 150, "sync")
    assert c.remote_ca_file == "/etc/ca.pem"
    assert "hunter2" not in repr(c) and "bob:***@10.0.0.5:6380/1" in repr(c)
    assert Config.from_env({**env, "DYNBLOCK_REMOTE_TTL_S": "0"}).remote_ttl_s is None
    with pytest.raises(EnvError, match="DYNBLOCK_REMOTE_WRITE"):
        Config.from_env({**env, "DYNBLOCK_REMOTE_WRITE": "later"})
    base = dict(block_size=4096, host_blocks=1)
    with pytest.raises(ValueError, match="remote must be a redis://") as e:
        Config(**base, remote="memcached://u:hunter2@h:1")
    assert "hunter2" not in str(e.value)
    for bad, match in ((dict(remote_prefix="a b"), "remote_prefix"),
                       (dict(remote_ttl_s=0), "remote_ttl_s"),
                       (dict(remote_timeout_ms=0), "remote_timeout_ms"),
                       (dict(remote_write="maybe"), "remote_write")):
        with pytest.raises(ValueError, match=match):
            Config(**base, remote="redis://h:1", **bad)


def test_remote_integer_settings_come_from_the_one_table() -> None:
    import dynblock

    d = dynblock._core.settings_defaults()
    c = Config(block_size=4096, host_blocks=1, remote="redis://h:1")
    assert (c.remote_timeout_ms, c.remote_queue_bytes) == (d["remote_timeout_ms"],
                                                           d["remote_queue_bytes"])
    base = dict(block_size=4096, host_blocks=1, remote="redis://h:1")
    for bad, match in ((dict(remote_timeout_ms=600_001), "remote_timeout_ms .* between 1 and 600000"),
                       (dict(remote_queue_bytes=10), "remote_queue_bytes .* between 1048576"),
                       (dict(remote_ttl_s=True), "remote_ttl_s must be an int")):
        with pytest.raises((ValueError, TypeError), match=match):
            Config(**base, **bad)
    # The tier itself refuses what Config refuses (no silent clamp to 1 ms).
    with pytest.raises(ValueError, match="remote_timeout_ms .* got 0"):
        dynblock._core.RemoteTier("redis://127.0.0.1:1", 4096, timeout_ms=0)
    with pytest.raises(EnvError, match="DYNBLOCK_REMOTE_QUEUE_BYTES"):
        Config.from_env({"DYNBLOCK_REMOTE_QUEUE_BYTES": "5", "DYNBLOCK_REMOTE_URL": "redis://h:1"},
                        block_size=4096, host_blocks=1)


# --- configuration and environment --------------------------------------------------


def test_a_tier_smaller_than_one_block_is_an_error(clean_env) -> None:
    with pytest.raises(ValueError, match="host_bytes=1000 is less than one block"):
        Config(host_bytes=1000, block_size=1 << 20)
    with pytest.raises(ValueError, match="disk_bytes=4095 is less than one block"):
        Config(disk_bytes=4095, block_size=4096, host_blocks=1)
    with pytest.raises(ValueError, match="less than one block"):
        Config.from_env({"DYNBLOCK_BLOCK_SIZE": str(2 << 20), "DYN_KVBM_CPU_CACHE_GB": "0.001"})
    assert Config(host_bytes=0, disk_blocks=1, block_size=4096).host_blocks == 0  # 0 means none


def test_env_precedence_is_the_documented_one(clean_env) -> None:
    env = {"DYNBLOCK_BLOCK_SIZE": "4096", "DYNBLOCK_HOST_BYTES": "40960",
           "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "3", "DYN_KVBM_CPU_CACHE_GB": "1"}
    assert Config.from_env(env).host_blocks == 10  # ours (bytes) beats Dynamo's override
    env.pop("DYNBLOCK_HOST_BYTES")
    assert Config.from_env(env).host_blocks == 3  # Dynamo's override beats Dynamo's GB
    env["DYNBLOCK_HOST_BLOCKS"] = "7"
    assert Config.from_env(env).host_blocks == 7
    assert "DYNBLOCK_<TIER>_BYTES" in dynblock.config.__doc__


@pytest.mark.parametrize("value", ["1_000", "\u0663", "+5", "0x10", " 1 2"])
def test_integers_are_plain_ascii_decimal(clean_env, value: str) -> None:
    with pytest.raises(dynblock.EnvError, match="DYNBLOCK_HOST_BLOCKS"):
        Config.from_env({"DYNBLOCK_BLOCK_SIZE": "4096", "DYNBLOCK_HOST_BLOCKS": value})


@pytest.mark.parametrize("env,field", [
    ({"DYNBLOCK_BLOCK_SIZE": str(2**64), "DYNBLOCK_HOST_BLOCKS": "1"}, "block_size"),
    ({"DYNBLOCK_BLOCK_SIZE": "4096", "DYN_KVBM_DISK_CACHE_GB": "1e30"}, "disk_bytes"),
    ({"DYNBLOCK_BLOCK_SIZE": "4096", "DYNBLOCK_HOST_BLOCKS": "1", "DYNBLOCK_IO_DEPTH": "5000"}, "io_depth"),
])
def test_absurd_values_fail_naming_the_variable_and_the_field(clean_env, env,
                                                                  field: str) -> None:
    var = next(k for k in env if k not in ("DYNBLOCK_BLOCK_SIZE", "DYNBLOCK_HOST_BLOCKS")
               or field == "block_size" and k == "DYNBLOCK_BLOCK_SIZE")
    with pytest.raises(dynblock.EnvError, match=f"^environment variable {var}=.*: {field}"):
        Config.from_env(env)


def test_numpy_integers_and_stripped_paths(clean_env, tmp_path: Path) -> None:
    c = Config(block_size=np.int64(4096), host_blocks=np.uint32(2))
    assert c.block_size == 4096 and type(c.block_size) is int and c.host_blocks == 2
    c = Config.from_env({"DYNBLOCK_BLOCK_SIZE": "4096", "DYNBLOCK_DISK_BLOCKS": "2",
                         "DYNBLOCK_DISK_DIR": f" {tmp_path} "})
    assert c.disk_dir == str(tmp_path)
    with pytest.raises(ValueError, match="disk_dir=.* and disk_path=.* disagree"):
        Config.from_env({"DYNBLOCK_BLOCK_SIZE": "4096", "DYNBLOCK_DISK_BLOCKS": "2",
                         "DYNBLOCK_DISK_DIR": "/var/tmp", "DYNBLOCK_PERSIST": "1",
                         "DYNBLOCK_DISK_PATH": str(tmp_path / "kv.bin")})


def test_explicit_numa_none_does_not_read_the_environment(clean_env) -> None:
    clean_env.setenv("DYN_MEMORY_DISABLE_NUMA", "")  # malformed, but binding was not asked for
    with BlockManager(Config(block_size=4096, host_blocks=2, numa_node=None, pin=False)) as kv:
        assert kv.host is not None and kv.host.numa_node is None
    with pytest.raises(dynblock.EnvError, match="DYN_MEMORY_DISABLE_NUMA"):
        HostStorage(1, 4096, numa_node=0, pin=False)


def test_one_message_per_setting_wherever_it_is_given(clean_env, tmp_path: Path) -> None:
    msgs = set()
    for make in (lambda: Config(block_size=4096, disk_blocks=1, io_depth=0),
                 lambda: DiskStorage(tmp_path, 1, 4096, io_depth=0),
                 lambda: dynblock._core.check_setting("io_depth", 0)):
        with pytest.raises(ValueError) as e:
            make()
        msgs.add(str(e.value))
    assert len(msgs) == 1 and "io_depth" in msgs.pop()
    defaults = dynblock._core.settings_defaults()
    import inspect

    for name, field in (("worker_nice", "worker_nice"), ("disk_engine", "engine")):
        assert getattr(Config(block_size=1, host_blocks=1), name) == defaults[name]
        assert inspect.signature(DiskStorage).parameters[field].default == defaults[name]
    # io_depth has no fixed default: each storage picks it from its block size and device.
    assert "io_depth" not in defaults and Config(block_size=1, host_blocks=1).io_depth is None


def test_every_variable_of_the_settings_table_reaches_its_field() -> None:
    """The engine's one table (rust/settings.rs ENV) drives from_env: each variable alone
    sets its field, and the docs (README, docs/, config's own table) name no other."""
    import re
    from pathlib import Path

    from dynblock import _env, config

    sample = {"int": "3", "int_or_auto": "auto", "bool": "1", "str": "x", "decimal_gb": "0.5",
              "disables": "1", "zero_fill": "0", "seconds_or_none": "7"}
    expect = {"int": 3, "int_or_auto": "auto", "bool": True, "str": "x", "decimal_gb": 5 * 10**8,
              "zero_fill": "sparse-fallback", "seconds_or_none": 7}
    names = set()
    for _, group in _env.TABLE:
        for var, field, form, choices, _ in group:
            names.add(var)
            value = choices[-1] if form == "choice" else sample[form]
            got = _env.read_table({var: value})
            want = choices[-1] if form == "choice" else expect.get(form, _env.OFF.get(field))
            assert got == {field: (var, want)}, var
            assert f"``{var}``" in (config.__doc__ or "")
    root = Path(__file__).resolve().parents[1]
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for var in re.findall(r"\b(?:DYNBLOCK|DYN_KVBM|DYN_MEMORY)_[A-Z_]*[A-Z]\b", doc.read_text()):
            assert var in names, f"{doc.name} names {var}, which dynblock does not read"
    # Ours wins even when it says "not disabled"; a disabling switch wins over a node number.
    env = {"DYNBLOCK_DISABLE_NUMA": "0", "DYN_MEMORY_DISABLE_NUMA": "1", "DYNBLOCK_NUMA_NODE": "1"}
    assert _env.read_table(env)["numa_node"] == ("DYNBLOCK_NUMA_NODE", 1)
    env["DYNBLOCK_DISABLE_NUMA"] = "1"
    assert _env.read_table(env)["numa_node"] == ("DYNBLOCK_DISABLE_NUMA", None)
