"""Adapters with their own chat template (tokenizer_config.json or chat_template.jinja in the
upload): each adapter's chats are rendered by its template, the base's by the base's, in one
mixed batch; bad tokenizer files are refused at upload; an in-place reload swaps the template."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jinja2
import openai
import pytest
from tokenizers import Tokenizer as HFTokenizer

from adapters.chat_template import RENDER_SECONDS
from adapters.format import CONFIG_FILE, WEIGHTS_FILE
from tests.integration.conftest import CHAT_TEMPLATE, MODEL_NAME, Oracle
from tests.integration.live_server import LiveServer
from tests.integration.test_tool_calls import HERMES_CALL, TOOLS

# Two layouts unlike each other and unlike the base's CHAT_TEMPLATE.
TEMPLATE_A = (
    "{% for m in messages %}### {{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### ASSISTANT:{% endif %}"
)
TEMPLATE_B = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }} (said {{ m['role'] }}). "
    "{% endfor %}{{ eos_token }}"
)
MESSAGES = [
    {"role": "system", "content": "Built-in functions"},
    {"role": "user", "content": "Return a new list"},
]
MAX_TOKENS = 6
# Hermes-family (its calls in <tool_call> tags) without printing the tools, to stay short.
HERMES_LIKE = "{# calls: <tool_call>{...}</tool_call> #}" + TEMPLATE_A


def render(template: str, messages: list[dict[str, str]]) -> str:
    """What the test expects a template to produce (plain jinja2, as transformers renders)."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
    )


def make_upload(source: Path, dest: Path, extra: dict[str, str]) -> Path:
    """An adapter folder: the PEFT files of source plus the given tokenizer files."""
    dest.mkdir(parents=True)
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(source / file, dest / file)
    for file, content in extra.items():
        (dest / file).write_text(content)
    return dest


def upload(server: LiveServer, name: str, folder: Path, method: str = "POST") -> httpx.Response:
    files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]
    url = "/v1/adapters" if method == "POST" else f"/v1/adapters/{name}"
    with server.client(admin=True) as http:
        return http.request(method, url, data={"name": name}, files=files)


def config_with(template: str) -> dict[str, str]:
    config = {"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"}
    return {"tokenizer_config.json": json.dumps(config)}


@pytest.fixture(scope="module")
def templated(
    server: LiveServer,
    oracle: Oracle,
    spare_adapters: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    """Uploaded adapters with their own templates: name -> template (the two compared in
    the mixed batch; tmpl-hermes is uploaded too)."""
    root = tmp_path_factory.mktemp("templated")
    folders = {
        "tmpl-a": make_upload(spare_adapters / "spare-0", root / "a", config_with(TEMPLATE_A)),
        "tmpl-b": make_upload(
            spare_adapters / "spare-1", root / "b", {"chat_template.jinja": TEMPLATE_B}
        ),
        "tmpl-hermes": make_upload(
            spare_adapters / "spare-2", root / "h", {"chat_template.jinja": HERMES_LIKE}
        ),
    }
    for name, folder in folders.items():
        response = upload(server, name, folder)
        assert response.status_code == 201, response.text
        oracle.register(name, folder)
    return {"tmpl-a": TEMPLATE_A, "tmpl-b": TEMPLATE_B}


@pytest.fixture(scope="module")
def hf_tok(model_dir: Path) -> HFTokenizer:
    return HFTokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture
def sdk(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0) as c:
        yield c


def test_adapters_and_base_render_chats_with_their_own_templates_in_one_batch(
    server: LiveServer, oracle: Oracle, templated: dict[str, str], hf_tok: HFTokenizer
) -> None:
    templates = {MODEL_NAME: CHAT_TEMPLATE, **templated}
    models = [*templates] * 3

    async def chat(client: openai.AsyncOpenAI, model: str) -> tuple[int, str]:
        out = await client.chat.completions.create(
            model=model,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        assert out.usage is not None
        return out.usage.prompt_tokens, out.choices[0].message.content or ""

    async def run_all() -> list[tuple[int, str]]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0
        ) as client:
            return await asyncio.gather(*(chat(client, m) for m in models))

    results = asyncio.run(run_all())
    lengths = set()
    for model, (prompt_tokens, text) in zip(models, results, strict=True):
        ids = hf_tok.encode(render(templates[model], MESSAGES), add_special_tokens=False).ids
        assert prompt_tokens == len(ids), model
        adapter = None if model == MODEL_NAME else model
        assert text == oracle.complete(adapter, ids, max_tokens=MAX_TOKENS), model
        lengths.add(len(ids))
    assert len(lengths) == 3  # the three templates give three different prompts


def test_adapter_info_says_which_adapters_have_their_own_template(
    server: LiveServer, templated: dict[str, str]
) -> None:
    with server.client() as http:
        assert http.get("/v1/adapters/tmpl-a").json()["has_chat_template"] is True
        assert http.get("/v1/adapters/lora-00").json()["has_chat_template"] is False


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"tokenizer_config.json": json.dumps({"eos_token": "<|im_end|>"})},
            "adds 1 token the base model lacks ('<|im_end|>')",
        ),
        (config_with("{% for m in messages %}"), "chat_template does not compile"),
        ({"added_tokens.json": json.dumps({"</s>": 9})}, "other ids than the base model"),
        ({"tokenizer.json": "{}"}, "tokenizer.json is not a valid tokenizer file"),
    ],
)
def test_bad_tokenizer_files_are_refused_at_upload_and_register_nothing(
    server: LiveServer,
    spare_adapters: Path,
    tmp_path: Path,
    extra: dict[str, str],
    message: str,
) -> None:
    folder = make_upload(spare_adapters / "spare-2", tmp_path / "bad", extra)
    response = upload(server, "tmpl-bad", folder)
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error["message"]
    assert str(tmp_path) not in error["message"]
    with server.client() as http:
        assert http.get("/v1/adapters/tmpl-bad").status_code == 404


def test_a_template_that_raises_while_rendering_is_a_400_for_that_request(
    server: LiveServer, sdk: openai.OpenAI, spare_adapters: Path, tmp_path: Path
) -> None:
    strict = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    folder = make_upload(spare_adapters / "spare-3", tmp_path / "strict", config_with(strict))
    assert upload(server, "tmpl-strict", folder).status_code == 201
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="tmpl-strict", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert "no system role" in info.value.message
    out = sdk.chat.completions.create(
        model="tmpl-strict",
        messages=MESSAGES[1:],
        max_tokens=2,  # type: ignore[arg-type]
    )
    assert out.choices[0].finish_reason == "length"


def test_an_in_place_reload_swaps_the_template(
    server: LiveServer,
    sdk: openai.OpenAI,
    spare_adapters: Path,
    tmp_path: Path,
    hf_tok: HFTokenizer,
) -> None:
    def prompt_tokens() -> int:
        out = sdk.chat.completions.create(model="tmpl-swap", messages=MESSAGES, max_tokens=1)  # type: ignore[arg-type]
        assert out.usage is not None
        return out.usage.prompt_tokens

    def expected(template: str) -> int:
        return len(hf_tok.encode(render(template, MESSAGES), add_special_tokens=False).ids)

    first = make_upload(spare_adapters / "spare-0", tmp_path / "first", config_with(TEMPLATE_A))
    assert upload(server, "tmpl-swap", first).status_code == 201
    assert prompt_tokens() == expected(TEMPLATE_A)
    second = make_upload(spare_adapters / "spare-0", tmp_path / "second", config_with(TEMPLATE_B))
    assert upload(server, "tmpl-swap", second, method="PUT").status_code == 200
    assert prompt_tokens() == expected(TEMPLATE_B)
    plain = make_upload(spare_adapters / "spare-0", tmp_path / "plain", {})
    assert upload(server, "tmpl-swap", plain, method="PUT").status_code == 200
    assert prompt_tokens() == expected(CHAT_TEMPLATE)  # back to the base's


def test_the_adapter_template_decides_how_tool_calls_are_parsed(
    sdk: openai.OpenAI, templated: dict[str, str]
) -> None:
    def reply(model: str) -> Any:
        return sdk.chat.completions.create(
            model=model,
            messages=MESSAGES[1:],  # type: ignore[arg-type]
            tools=TOOLS[1:],  # type: ignore[arg-type]
            max_tokens=90,
            temperature=0,
            extra_body={"guided_regex": re.escape(HERMES_CALL)},
        ).choices[0]

    hermes = reply("tmpl-hermes")
    assert hermes.finish_reason == "tool_calls" and hermes.message.tool_calls is not None
    call = hermes.message.tool_calls[0].function
    assert (call.name, json.loads(call.arguments)) == ("add", {"a": 4, "b": 5})
    plain = reply("tmpl-a")  # a template of the default (Llama 3 JSON) family: text stays text
    assert plain.finish_reason != "tool_calls" and plain.message.content == HERMES_CALL


def test_a_template_that_loops_forever_is_stopped_within_its_time_bound(
    server: LiveServer, sdk: openai.OpenAI, spare_adapters: Path, tmp_path: Path
) -> None:
    """Uploaded with the admin key, a runaway template still cannot hold the tokenizer
    threads every request shares: it is stopped after RENDER_SECONDS, a 400 for its request
    (/health answers at once and another chat within that bound), and that version's chats
    are refused at once afterwards, until a reload."""
    looping = (
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    folder = make_upload(spare_adapters / "spare-2", tmp_path / "looping", config_with(looping))
    assert upload(server, "tmpl-looping", folder).status_code == 201
    with ThreadPoolExecutor(max_workers=4) as pool:
        stuck = [
            pool.submit(
                sdk.chat.completions.create,
                model="tmpl-looping",
                messages=MESSAGES[1:],
                max_tokens=2,
            )
            for _ in range(2)
        ]
        time.sleep(0.3)  # both tokenizer threads are now inside the loop
        start = time.monotonic()
        with server.client() as http:
            assert http.get("/health").status_code == 200
        other = sdk.chat.completions.create(model=MODEL_NAME, messages=MESSAGES[1:], max_tokens=2)  # type: ignore[arg-type]
        assert other.choices[0].finish_reason == "length"
        assert time.monotonic() - start < RENDER_SECONDS + 5
        for future in stuck:
            with pytest.raises(openai.BadRequestError) as info:
                future.result()
            assert "ran for more than" in info.value.message
    # From then on that version's chats are refused at once, not after another 2 s each.
    start = time.monotonic()
    with pytest.raises(openai.BadRequestError, match="refused until the adapter is reloaded"):
        sdk.chat.completions.create(model="tmpl-looping", messages=MESSAGES[1:], max_tokens=2)  # type: ignore[arg-type]
    assert time.monotonic() - start < 1.0
    # A reload with a working template serves again.
    fixed = make_upload(spare_adapters / "spare-2", tmp_path / "fixed", config_with(TEMPLATE_A))
    assert upload(server, "tmpl-looping", fixed, method="PUT").status_code == 200
    out = sdk.chat.completions.create(model="tmpl-looping", messages=MESSAGES[1:], max_tokens=2)  # type: ignore[arg-type]
    assert out.choices[0].finish_reason == "length"
