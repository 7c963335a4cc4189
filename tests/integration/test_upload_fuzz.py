"""Hypothesis fuzzing of adapter uploads: random adapter_config.json fields, safetensors
headers and archive members. Properties: an upload is registered or refused with an
AdapterError (a 400), never anything else (a 5xx); every example finishes in bounded time;
a refused upload registers and stores nothing.

Most examples run in-process against a real AdapterRegistry (the code behind the upload
route); a bounded number go over HTTP to a live server. Examples are derandomized (a fixed
sequence per test) so CI runs are stable; the whole file takes well under a minute.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import struct
import tarfile
import time
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from adapters import AdapterError, AdapterRegistry, AdapterStore, extract_adapter_files
from adapters.format import CONFIG_FILE, WEIGHTS_FILE
from tests.integration.conftest import ENGINE_FLAGS, MODEL_NAME, serve_flags
from tests.integration.live_server import LiveServer
from tests.unit.adapter_fixtures import MAX_RANK, tiny_base, tiny_files

LIMIT = 1 << 20  # the byte budget of an upload (the live server runs --max-upload-mb 1)
EXAMPLE_LIMIT_S = 5.0  # one example's wall time, generous for a loaded 2-core machine
FUZZ = settings(
    max_examples=120,
    deadline=timedelta(seconds=EXAMPLE_LIMIT_S),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
VALID = tiny_files(rank=2)
VALID_CONFIG: dict[str, Any] = json.loads(VALID[CONFIG_FILE])
VALID_TENSORS = load(VALID[WEIGHTS_FILE])
_names = (f"fuzz-{i}" for i in itertools.count())

# ---- strategies ----------------------------------------------------------------------------

REGEX_PARTS = [
    "(",
    ")",
    ".*",
    "*",
    "+",
    "?",
    "|",
    "[",
    "]",
    "{1000}",
    "\\",
    "\\1",
    "(?=",
    "(?<=",
    "(?P<idx>",
    "^",
    "$",
    ".",
    "\\d+",
    "Z",
    "(.*)*",
    "q_proj",
    "v_proj",
    "layers",
    "self_attn",
    "\\.",
]
regexes = st.lists(st.sampled_from(REGEX_PARTS), max_size=12).map("".join)
long_strings = st.builds(
    lambda s, n: s * n, st.sampled_from(["a", "(", ".*", "q_proj|"]), st.integers(1, 6000)
)
numbers = st.one_of(
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2, 8, 64, 1e30, -1e30, 1e308, 2**63, 10**400, 4096.0, 0.5]),
)
leaves = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20), regexes, long_strings)
junk = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
module_names = st.one_of(
    regexes, st.sampled_from(["q_proj", "v_proj", "lm_head", "embed_tokens", "norm", "all-linear"])
)
field_values = st.one_of(
    junk,
    module_names,
    st.lists(module_names, max_size=4),
    st.dictionaries(module_names, st.one_of(st.integers(-2, 40), numbers, junk), max_size=4),
    st.builds(lambda n: {f"k{i}": 2 for i in range(n)}, st.sampled_from([1025, 3000])),
)
CONFIG_FIELDS = [
    "r",
    "lora_alpha",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "peft_type",
    "task_type",
    "bias",
    "use_dora",
    "fan_in_fan_out",
    "rope_scaling_factor",
    "base_model_name_or_path",
]
config_changes = st.dictionaries(
    st.one_of(st.sampled_from(CONFIG_FIELDS), st.text(max_size=10)), field_values, max_size=4
)


@st.composite
def config_bytes(draw: st.DrawFn) -> bytes:
    """A config: the valid one with fields changed, or bytes that may not be JSON at all."""
    kind = draw(st.sampled_from(["changed"] * 8 + ["raw", "cut", "deep", "digits"]))
    if kind == "raw":
        return draw(st.binary(max_size=200))
    if kind == "cut":
        text = VALID[CONFIG_FILE]
        return text[: draw(st.integers(0, len(text)))]
    if kind == "deep":
        depth = draw(st.integers(500, 50_000))
        return b'{"r": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "digits":
        return b'{"lora_alpha": ' + b"9" * draw(st.integers(300, 20_000)) + b"}"
    config = {**VALID_CONFIG, **draw(config_changes)}
    return json.dumps(config).encode()


SAFETENSORS_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "XX", 3, None]
header_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(SAFETENSORS_DTYPES),
        "shape": st.lists(
            st.one_of(st.integers(0, 70), st.sampled_from([2**31, 2**64, -1])), max_size=3
        ),
        "data_offsets": st.lists(
            st.one_of(st.integers(0, 70_000), st.sampled_from([2**63, -1])), max_size=3
        ),
    }
)


@st.composite
def weights_bytes(draw: st.DrawFn) -> bytes:
    """A safetensors file: a random header, the valid file damaged, or hostile values."""
    kind = draw(st.sampled_from(["header", "header", "flip", "values", "cut"]))
    valid = VALID[WEIGHTS_FILE]
    if kind == "flip":
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "cut":
        return valid[: draw(st.integers(0, len(valid)))]
    if kind == "values":
        tensors = dict(VALID_TENSORS)
        key = draw(st.sampled_from(sorted(tensors)))
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e6, 0.0]))
        dtype = draw(st.sampled_from(["float32", "float16", "bfloat16", "float64", "int32"]))
        tensors[key] = tensors[key].fill_(value) if value == value else tensors[key] * value
        tensors[key] = tensors[key].to(getattr(torch, dtype))
        return save(tensors)
    keys = st.one_of(st.sampled_from(sorted(VALID_TENSORS)), st.text(max_size=30))
    header = draw(st.dictionaries(keys, st.one_of(header_entries, junk), max_size=6))
    if draw(st.booleans()):
        header["__metadata__"] = draw(junk)
    text = json.dumps(header).encode()
    declared = draw(st.one_of(st.just(len(text)), st.integers(0, 2**64 - 1)))
    return struct.pack("<Q", declared) + text + bytes(draw(st.integers(0, 4096)))


member_names = st.one_of(
    st.sampled_from(
        [
            CONFIG_FILE,
            WEIGHTS_FILE,
            f"x/{CONFIG_FILE}",
            f"x/{WEIGHTS_FILE}",
            f"../{CONFIG_FILE}",
            f"/{WEIGHTS_FILE}",
            f"a/../../{CONFIG_FILE}",
            f"C:\\{CONFIG_FILE}",
            f"./{CONFIG_FILE}",
            "__MACOSX/x",
            "adapter_model.bin",
            "x",
            "x/",
            "",
        ]
    ),
    st.text(min_size=1, max_size=20),
)
members = st.lists(
    st.tuples(
        member_names,
        st.sampled_from(["file", "file", "file", "dir", "symlink", "hardlink", "fifo"]),
        st.one_of(st.sampled_from(list(VALID.values())), st.binary(max_size=64)),
    ),
    max_size=6,
)


@st.composite
def archives(draw: st.DrawFn) -> tuple[str, bytes]:
    """(filename, bytes) of a tar, tar.gz or zip with random members, maybe a flood of them."""
    suffix = draw(st.sampled_from([".tar.gz", ".tgz", ".tar", ".zip"]))
    entries = draw(members)
    if draw(st.booleans()):  # often the two real files, so later members decide
        entries = [
            (CONFIG_FILE, "file", VALID[CONFIG_FILE]),
            (WEIGHTS_FILE, "file", VALID[WEIGHTS_FILE]),
            *entries,
        ]
    flood = draw(st.sampled_from([0, 0, 0, 0, 1001, 1500]))
    entries += [(f"junk/{i}", "file", b"") for i in range(flood)]
    try:
        data = _zip(entries) if suffix == ".zip" else _tar(entries, suffix != ".tar")
    except (ValueError, UnicodeError, tarfile.TarError, zipfile.BadZipFile, OSError):
        reject()  # a name the writer itself cannot encode
    if draw(st.booleans()):  # a damaged archive
        cut = draw(st.integers(0, len(data)))
        data = data[:cut]
    return f"adapter{suffix}", data


TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def _tar(entries: list[tuple[str, str, bytes]], compress: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w:gz" if compress else "w", format=tarfile.PAX_FORMAT
    ) as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.type = TAR_TYPES[kind]
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.linkname = WEIGHTS_FILE if "link" in kind else ""
                tar.addfile(info)
    return buf.getvalue()


def _zip(entries: list[tuple[str, str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, kind, data in entries:
            info = zipfile.ZipInfo(name + ("/" if kind == "dir" and not name.endswith("/") else ""))
            if kind == "symlink":
                info.external_attr = 0o120777 << 16
            zf.writestr(info, b"" if kind == "dir" else data)
    return buf.getvalue()


uploads = st.one_of(
    st.builds(lambda c: {CONFIG_FILE: c, WEIGHTS_FILE: VALID[WEIGHTS_FILE]}, config_bytes()),
    st.builds(lambda w: {CONFIG_FILE: VALID[CONFIG_FILE], WEIGHTS_FILE: w}, weights_bytes()),
    archives(),
)

# ---- in-process: the registry behind the upload route --------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdapterRegistry]:
    store = AdapterStore(tmp_path_factory.mktemp("fuzz-store"), durable=False)
    yield AdapterRegistry(store, tiny_base(), MAX_RANK, host_cache_bytes=1 << 20)
    store.close()


def submit(registry: AdapterRegistry, upload: dict[str, bytes] | tuple[str, bytes]) -> str:
    """Validate and register as the upload route does; "registered" or "refused: ...". Only
    AdapterError (the route's 400) may escape as a refusal, and it must leave nothing behind."""
    name = next(_names)
    stored_before = sorted(p.name for p in registry.store.blobs.iterdir())
    start = time.perf_counter()
    try:
        files = (
            extract_adapter_files(upload[1], upload[0], LIMIT)
            if isinstance(upload, tuple)
            else upload
        )
        registry.register_files(name, files, "upload")
    except AdapterError as exc:
        outcome = f"refused: {' '.join(str(exc).split()[:2])}"
        assert registry.get(name) is None
        assert registry.store.get(name) is None
        assert sorted(p.name for p in registry.store.blobs.iterdir()) == stored_before
    else:
        outcome = "registered"
        assert registry.get(name) is not None
    assert time.perf_counter() - start < EXAMPLE_LIMIT_S
    return outcome


@FUZZ
@given(config=config_bytes())
def test_fuzzed_configs_register_or_are_refused(registry: AdapterRegistry, config: bytes) -> None:
    event(submit(registry, {CONFIG_FILE: config, WEIGHTS_FILE: VALID[WEIGHTS_FILE]}))


@FUZZ
@given(weights=weights_bytes())
def test_fuzzed_safetensors_register_or_are_refused(
    registry: AdapterRegistry, weights: bytes
) -> None:
    event(submit(registry, {CONFIG_FILE: VALID[CONFIG_FILE], WEIGHTS_FILE: weights}))


@settings(FUZZ, max_examples=80)
@given(archive=archives())
def test_fuzzed_archives_register_or_are_refused(
    registry: AdapterRegistry, archive: tuple[str, bytes]
) -> None:
    event(submit(registry, archive))


def test_the_valid_upload_the_fuzzers_start_from_registers(registry: AdapterRegistry) -> None:
    assert submit(registry, dict(VALID)) == "registered"
    archive = _zip([(n, "file", d) for n, d in VALID.items()])
    assert submit(registry, ("adapter.zip", archive)) == "registered"


# ---- over HTTP: a live server never answers a fuzzed upload with a 5xx ---------------------


@pytest.fixture(scope="module")
def fuzz_upload_server(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    args = serve_flags(**ENGINE_FLAGS, max_upload_mb=1, served_model_name=MODEL_NAME)
    live = LiveServer(model_dir, tmp_path_factory.mktemp("upload-fuzz") / "data", args).start()
    yield live
    live.stop()


@settings(FUZZ, max_examples=30)
@given(upload=uploads)
def test_the_live_server_answers_fuzzed_uploads_with_201_or_400(
    fuzz_upload_server: LiveServer, upload: dict[str, bytes] | tuple[str, bytes]
) -> None:
    name = next(_names)
    if isinstance(upload, tuple):
        files = [("files", upload)]
    else:
        files = [("files", (n, data)) for n, data in upload.items()]
    start = time.perf_counter()
    with fuzz_upload_server.client(admin=True, timeout=EXAMPLE_LIMIT_S * 2) as http:
        response = http.post("/v1/adapters", data={"name": name}, files=files)
        elapsed = time.perf_counter() - start
        registered = http.get(f"/v1/adapters/{name}").status_code
        health = http.get("/health", timeout=1.0).status_code
    assert response.status_code in (201, 400), response.text
    assert elapsed < EXAMPLE_LIMIT_S
    assert registered == (200 if response.status_code == 201 else 404)
    assert health == 200
    if response.status_code == 400:
        assert response.json()["error"]["message"]
