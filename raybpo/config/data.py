"""The data floor's sections: the preference sources and ingest, the built-in benchmark."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from raybpo.config.base import Section

FORMATS = ("auto", "hh", "trl", "pku", "ultrafeedback", "judge", "columns")
Format = Literal[FORMATS]  # type: ignore[valid-type]


class SourceSpec(Section):
    """One preference input: a JSONL / JSONL.gz / Parquet file or folder, or a Hugging Face dataset name."""

    path: str
    format: Format = "auto"
    name: str | None = Field(None, description="The `source` name of its pairs (default: file or dataset name).")
    split: str = Field("train", description="Split of a Hugging Face dataset.")
    subset: str | None = Field(None, description="Config (subset) of a Hugging Face dataset.")
    columns: dict[str, str] | None = Field(
        None, description="format=columns: canonical field -> input column, for prompt, chosen, rejected."
    )
    pku_preference: Literal["better", "safer"] = Field(
        "better", description="PKU-SafeRLHF: use better_response_id or safer_response_id."
    )

    @field_validator("name")
    @classmethod
    def _name_is_one_folder_name(cls, name: str | None) -> str | None:
        """The name becomes a folder name (a reward model per source): one path part, so it cannot escape."""
        if name is not None and (not name.strip() or "/" in name or "\\" in name or name.startswith(".")):
            raise ValueError(f"source name {name!r} must be one folder name: not empty, no '/' or '\\', no leading '.'")
        return name

    @model_validator(mode="after")
    def _columns_need_mapping(self) -> SourceSpec:
        if self.format == "columns":
            missing = {"prompt", "chosen", "rejected"} - set(self.columns or {})
            if missing:
                raise ValueError(f"format=columns needs a `columns` mapping for {sorted(missing)}")
        return self


class IngestConfig(Section):
    sources: list[SourceSpec] = Field(default_factory=list)
    preset: Literal["none", "benchmark"] = Field("none", description="`benchmark`: generate the built-in data.")
    max_chars: int = Field(20_000, ge=1, description="Rows whose prompt + responses exceed this are quarantined.")
    max_bad_fraction: float = Field(
        0.2, ge=0.0, le=1.0, description="Fail when a source quarantines more than this share of its rows."
    )
    dedup: bool = True


class BenchmarkConfig(Section):
    """The built-in benchmark: generated prompts and pairs with a known ground-truth utility."""

    seed: int = 0
    sources: list[Literal["helpful", "concise", "harmless"]] = Field(
        default_factory=lambda: ["helpful", "concise", "harmless"], min_length=1
    )
    pairs_per_source: int = Field(600, ge=1)
    train_prompts: int = Field(240, ge=1, description="Distinct training prompts the pairs are drawn over.")
    eval_prompts: int = Field(48, ge=1, description="Held-out prompts, disjoint from the training prompts.")
    high_gap_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Share of pairs with a high utility gap.")
    low_gap: tuple[float, float] = Field((0.1, 0.6), description="Utility gap range of low-gap pairs.")
    high_gap: tuple[float, float] = Field((1.5, 6.0), description="Utility gap range of high-gap pairs.")
    flip_fraction: float = Field(0.1, ge=0.0, le=1.0, description="Share of pairs whose label is flipped.")
