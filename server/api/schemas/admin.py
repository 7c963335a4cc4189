"""Adapter management bodies: our /v1/adapters and vLLM's load/unload routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Residency(BaseModel):
    host: bool  # weights cached in host memory
    device: bool  # weights in the device page pool
    active_requests: int  # running or waiting requests for it


class AdapterInfo(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    rank: int
    max_rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    saved_modules: list[str]
    rope_scaling_factor: float
    size_bytes: int
    sha256: str
    created: int
    source: str
    parent: str
    version: int = 1  # 1, then +1 per in-place reload (since the server started)
    has_chat_template: bool = False  # ships its own chat template (else chats use the base's)
    residency: Residency | None = None
    requests_served: int | None = None  # since the server started; in paged listings


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]
    has_more: bool = False  # page on with after=<the last id>
    total: int | None = None  # adapters matching `search` (all of them without it)


class DeletedAdapter(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    # Replace a loaded adapter's weights under the same name (running requests keep the old).
    load_inplace: bool = False


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None
