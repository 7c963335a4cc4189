"""Merged adapters on the real server, through LoRAX's request shape and the openai SDK: the
greedy tokens equal PEFT's add_weighted_adapter model's, in mixed batches with plain adapters;
each spec merges once; a reloaded source never leaves a stale merge; bad specs get clear
errors in each API's shape."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.hf_reference import hf_greedy, load_hf
from tests.integration.conftest import MODEL_NAME, Oracle, adapter_name
from tests.integration.live_server import LiveServer
from tests.integration.test_adapters_api import upload_files
from tests.integration.test_lorax_api import ClientResponse, client_request

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Return a new list"}]
NEW_TOKENS = 10
# Rank 4 throughout (lora-00/04/08: q, v; lora-03: q, k, o with rsLoRA); lora-01 is rank 8.
LINEAR = {"ids": [adapter_name(0), adapter_name(3)], "weights": [0.6, 0.8]}
TIES = {
    "ids": [adapter_name(0), adapter_name(4), adapter_name(8)],
    "weights": [1.0, -0.5, 0.7],
    "merge_strategy": "ties",
    "density": 0.5,
    "majority_sign_method": "frequency",
}


def peft_merged_greedy(
    model_dir: Path, dirs: dict[str, Path], spec: dict[str, Any], prompt: list[int]
) -> list[int]:
    """PEFT's greedy tokens for the base with add_weighted_adapter(spec) active."""
    from peft import PeftModel

    names = spec["ids"]
    model = PeftModel.from_pretrained(load_hf(model_dir), str(dirs[names[0]]), names[0])
    for name in names[1:]:
        model.load_adapter(str(dirs[name]), adapter_name=name)
    model.add_weighted_adapter(
        names,
        spec["weights"],
        "merged",
        combination_type=spec.get("merge_strategy", "linear"),
        density=spec.get("density"),
        majority_sign_method=spec.get("majority_sign_method", "total"),
    )
    model.set_adapter("merged")
    return hf_greedy(model.eval(), prompt, NEW_TOKENS)


@pytest.fixture(scope="module")
def reference(model_dir: Path, adapter_dirs: dict[str, Path], oracle: Oracle):  # type: ignore[no-untyped-def]
    """PEFT's merged greedy tokens, memoized by (spec, prompt)."""

    @functools.cache
    def tokens(spec_key: str, prompt: tuple[int, ...]) -> list[int]:
        return peft_merged_greedy(model_dir, adapter_dirs, SPECS[spec_key], list(prompt))

    return tokens


SPECS = {"linear": LINEAR, "ties": TIES}


def text_of(tok: Any, tokens: list[int]) -> str:
    """The text the server returns for these tokens: an incomplete UTF-8 tail is dropped."""
    return tok.decode(tokens).rstrip("\ufffd")


def lorax_generate(server: LiveServer, **parameters: Any) -> httpx.Response:
    payload = client_request(
        PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos_token=True, details=True, **parameters
    )
    with server.client() as http:
        return http.post("/", json=payload)


def lorax_tokens(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    reply = ClientResponse(**response.json()[0])
    assert reply.details is not None
    return [t.id for t in reply.details.tokens]


def test_lorax_merges_match_peft_in_a_mixed_batch(
    server: LiveServer, oracle: Oracle, reference: Any
) -> None:
    prompt = tuple(oracle.tokens(PROMPT))
    plain = [adapter_name(5), adapter_name(10), None]
    with ThreadPoolExecutor(max_workers=8) as pool:
        merged = {
            k: pool.submit(lorax_generate, server, merged_adapters=s) for k, s in SPECS.items()
        }
        others = {a: pool.submit(lorax_generate, server, adapter_id=a) for a in plain}
        for key, future in merged.items():
            assert lorax_tokens(future.result()) == reference(key, prompt), key
        for adapter, future in others.items():
            reply = future.result()
            assert reply.status_code == 200, reply.text
            expected = oracle.complete(adapter, PROMPT, max_tokens=NEW_TOKENS, ignore_eos=True)
            assert reply.json()[0]["generated_text"] == expected


def test_openai_sdk_completions_and_chat_serve_merges_like_peft(
    server: LiveServer, oracle: Oracle, reference: Any
) -> None:
    extra = {"merged_adapters": TIES, "ignore_eos": True}
    tok = oracle.engine.tokenizer  # the server's

    async def run() -> tuple[str, str, str]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0
        ) as client:
            completion = client.completions.create(
                model=MODEL_NAME,
                prompt=PROMPT,
                max_tokens=NEW_TOKENS,
                temperature=0,
                extra_body=extra,
            )
            chat = client.chat.completions.create(
                model=MODEL_NAME,
                messages=MESSAGES,
                max_tokens=NEW_TOKENS,  # type: ignore[arg-type]
                temperature=0,
                extra_body=extra,
            )
            plain = client.completions.create(
                model=adapter_name(7),
                prompt=PROMPT,
                max_tokens=NEW_TOKENS,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            c, ch, p = await asyncio.gather(completion, chat, plain)
            return c.choices[0].text, ch.choices[0].message.content or "", p.choices[0].text

    completion, chat, plain = asyncio.run(run())
    assert completion == text_of(tok, reference("ties", tuple(oracle.tokens(PROMPT))))
    assert chat == text_of(tok, reference("ties", tuple(oracle.chat_prompt(MESSAGES))))
    assert plain == oracle.complete(adapter_name(7), PROMPT, max_tokens=NEW_TOKENS, ignore_eos=True)


def test_concurrent_identical_specs_all_get_peft_tokens(
    server: LiveServer, oracle: Oracle, model_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    spec = {"ids": [adapter_name(4), adapter_name(12)], "weights": [0.3, 0.9]}
    with ThreadPoolExecutor(max_workers=4) as pool:
        replies = list(pool.map(lambda _: lorax_generate(server, merged_adapters=spec), range(4)))
    expected = peft_merged_greedy(model_dir, adapter_dirs, spec, oracle.tokens(PROMPT))
    assert [lorax_tokens(r) for r in replies] == [expected] * 4


def test_a_source_reloaded_in_place_is_merged_again(
    server: LiveServer,
    spare_adapters: Path,
    model_dir: Path,
    adapter_dirs: dict[str, Path],
    oracle: Oracle,
) -> None:
    name = "merge-source"
    with server.client(admin=True) as http:
        assert (
            http.post(
                "/v1/adapters", data={"name": name}, files=upload_files(spare_adapters / "spare-0")
            ).status_code
            == 201
        )
    spec = {"ids": [adapter_name(0), name], "weights": [0.5, 1.0]}
    prompt = oracle.tokens(PROMPT)
    try:
        before = lorax_tokens(lorax_generate(server, merged_adapters=spec))
        dirs = {**adapter_dirs, name: spare_adapters / "spare-0"}
        assert before == peft_merged_greedy(model_dir, dirs, spec, prompt)
        with server.client(admin=True) as http:
            files = upload_files(spare_adapters / "spare-3")
            assert http.put(f"/v1/adapters/{name}", files=files).status_code == 200
        after = lorax_tokens(lorax_generate(server, merged_adapters=spec))
        dirs[name] = spare_adapters / "spare-3"
        assert after == peft_merged_greedy(model_dir, dirs, spec, prompt)
    finally:
        with server.client(admin=True) as http:
            http.delete(f"/v1/adapters/{name}")
    reply = lorax_generate(server, merged_adapters=spec)
    assert reply.status_code == 422
    assert f"adapter {name!r} does not exist" in reply.json()["error"]


BAD_SPECS: dict[str, tuple[dict[str, Any], str, str]] = {
    "unknown id": ({"ids": ["no-such-adapter"], "weights": [1.0]}, "ids", "does not exist"),
    "length mismatch": (
        {"ids": [adapter_name(0), adapter_name(4)], "weights": [1.0]},
        "weights",
        "2 ids but 1 weights",
    ),
    "bad strategy": (
        {**LINEAR, "merge_strategy": "svd"},
        "merge_strategy",
        "merge_strategy 'svd' is not one of linear, ties, dare_linear, dare_ties",
    ),
    "density zero": ({**TIES, "density": 0.0}, "density", "density must be in (0, 1]"),
    "density above one": ({**TIES, "density": 1.5}, "density", "density must be in (0, 1]"),
    "rank mismatch": (
        {"ids": [adapter_name(0), adapter_name(1)], "weights": [1.0, 1.0]},
        "ids",
        "same LoRA rank",
    ),
    "no ids": ({"ids": [], "weights": []}, "ids", "at least one adapter"),
}


@pytest.mark.parametrize("case", BAD_SPECS, ids=list(BAD_SPECS))
def test_bad_specs_are_refused_in_the_lorax_shape(server: LiveServer, case: str) -> None:
    spec, field, message = BAD_SPECS[case]
    reply = lorax_generate(server, merged_adapters=spec)
    assert reply.status_code == 422
    body = reply.json()
    assert body["error_type"] == "validation"
    assert f"parameters.merged_adapters.{field}" in body["error"]
    assert message in body["error"]


@pytest.mark.parametrize("case", BAD_SPECS, ids=list(BAD_SPECS))
def test_bad_specs_are_refused_in_the_openai_shape(server: LiveServer, case: str) -> None:
    spec, field, message = BAD_SPECS[case]
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)
    with sdk as c, pytest.raises(openai.BadRequestError) as err:
        c.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=2, extra_body={"merged_adapters": spec}
        )
    error = err.value.body
    assert isinstance(error, dict)
    assert error["param"] == f"merged_adapters.{field}"
    assert message in error["message"]


def test_merged_adapters_with_an_adapter_model_or_id_is_refused(server: LiveServer) -> None:
    reply = lorax_generate(server, adapter_id=adapter_name(0), merged_adapters=LINEAR)
    assert reply.status_code == 422
    assert "cannot both be set" in reply.json()["error"]
    with server.client() as http:
        body = {"model": adapter_name(0), "prompt": PROMPT, "merged_adapters": LINEAR}
        reply = http.post("/v1/completions", json=body)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "model"


def test_internal_merge_names_cannot_be_requested(server: LiveServer) -> None:
    assert lorax_tokens(lorax_generate(server, merged_adapters=LINEAR))
    with server.client() as http:
        body = {"model": ".merged/0", "prompt": PROMPT}
        assert http.post("/v1/completions", json=body).status_code == 404
        models = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert not any(m.startswith(".") for m in models)
