"""Reusable widget groups: the config form bound by key path, status/progress HTML, the LoRA stack."""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from engine.config import ConfigError, TrainConfig
from engine.config_fields import FieldSpec, config_fields
from engine.inference.request import LIMITS

# Form sections: (title, key-path prefix or exact paths). Fields not listed land in "Training".
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Model", ("model.",)),
    ("LoRA", ("adapter.",)),
    ("Optimizer", ("optimizer.", "lr_scheduler", "warmup_steps", "gradient_clipping")),
    ("Data", ("dataset.", "caching_batch_size")),
    ("Performance", ("performance.", "activation_checkpointing", "zero_stage")),
)
# The studio decides where files go; a multi-stage pipeline is not supported.
HIDDEN_FIELDS = frozenset({"output_dir", "cache_dir", "pipeline_stages"})
OPEN_SECTIONS = frozenset({"Training"})


def _section_of(path: str) -> str:
    for title, prefixes in SECTIONS:
        if any(path == p or (p.endswith(".") and path.startswith(p)) for p in prefixes):
            return title
    return "Training"


def _label(path: str) -> str:
    return path.split(".")[-1].replace("_", " ")


def _format_list(value: Any) -> str:
    return ", ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else ""


def _parse_list(text: str, item_type: str, path: str) -> list[Any]:
    items = [t.strip() for t in str(text or "").replace(";", ",").split(",") if t.strip()]
    try:
        if item_type == "int":
            return [int(float(t)) for t in items]
        if item_type == "float":
            return [float(t) for t in items]
    except ValueError:
        raise ConfigError(path, f"expected comma-separated {item_type}s, got {text!r}") from None
    return items


@dataclass
class ConfigForm:
    """Form widgets keyed by config key path (never by position), built from `config_fields()`."""

    specs: dict[str, FieldSpec] = field(default_factory=dict)
    components: dict[str, gr.components.Component] = field(default_factory=dict)

    @classmethod
    def build(cls, defaults: TrainConfig) -> "ConfigForm":
        form = cls()
        specs = [s for s in config_fields() if s.path not in HIDDEN_FIELDS]
        titles = ["Training"] + [t for t, _ in SECTIONS]
        for title in titles:
            members = [s for s in specs if _section_of(s.path) == title]
            if not members:
                continue
            # Switches go in their own row: squeezed between inputs they become unreadable.
            fields_first = [s for s in members if s.type != "bool"] + [s for s in members if s.type == "bool"]
            with gr.Accordion(title, open=title in OPEN_SECTIONS, elem_classes=["form-section"]):
                for row in ([s for s in fields_first if s.type != "bool"], [s for s in fields_first if s.type == "bool"]):
                    if not row:
                        continue
                    with gr.Row(equal_height=False, elem_classes=["form-grid"]):
                        for spec in row:
                            form.specs[spec.path] = spec
                            form.components[spec.path] = _component(spec, defaults.get(spec.path))
        return form

    @property
    def inputs(self) -> set[gr.components.Component]:
        return set(self.components.values())

    def to_config(self, values: dict[gr.components.Component, Any], base: TrainConfig) -> TrainConfig:
        """Apply every form value onto `base`; ConfigError names each bad key path."""
        cfg = base
        errors: list[tuple[str, str]] = []
        for path, component in self.components.items():
            spec = self.specs[path]
            try:
                cfg = cfg.with_value(path, widget_to_value(spec, values.get(component)))
            except ConfigError as exc:
                errors.extend(exc.errors)
        if errors:
            raise ConfigError(errors)
        return cfg

    def updates(self, cfg: TrainConfig) -> dict[gr.components.Component, Any]:
        """Widget values showing `cfg` (for presets and loaded TOML files)."""
        return {component: value_to_widget(self.specs[path], cfg.get(path))
                for path, component in self.components.items()}


def _component(spec: FieldSpec, value: Any) -> gr.components.Component:
    label, info = _label(spec.path), spec.help or None
    key = f"cfg-{spec.path}"
    if spec.type == "bool":
        return gr.Checkbox(value=bool(value), label=label, info=info, elem_id=key, min_width=220)
    if spec.choices:
        return gr.Dropdown(choices=list(spec.choices), value=value, label=label, info=info, elem_id=key,
                           min_width=220)
    if spec.type in ("int", "float") and spec.optional:
        # gr.Number cannot be empty (it shows 0); an optional number is a textbox where empty = default.
        return gr.Textbox(value="" if value is None else str(value), label=label, info=info, elem_id=key,
                          min_width=220, placeholder="default")
    if spec.type in ("int", "float"):
        return gr.Number(value=value, label=label, info=info, precision=0 if spec.type == "int" else None,
                         elem_id=key, min_width=220)
    if spec.type.startswith("list["):
        return gr.Textbox(value=_format_list(value), label=label, info=info, elem_id=key, min_width=220,
                          placeholder="comma-separated")
    return gr.Textbox(value="" if value is None else str(value), label=label, info=info, elem_id=key,
                      min_width=220)


def widget_to_value(spec: FieldSpec, raw: Any) -> Any:
    if spec.type.startswith("list["):
        return _parse_list(raw, spec.type[5:-1], spec.path)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None if spec.optional else raw
    if spec.type in ("int", "float") and isinstance(raw, str):
        try:
            raw = float(raw.strip())
        except ValueError:
            raise ConfigError(spec.path, f"expected a number, got {raw!r}") from None
    if spec.type == "int" and isinstance(raw, float) and raw.is_integer():
        return int(raw)
    return raw


def value_to_widget(spec: FieldSpec, value: Any) -> Any:
    if spec.type.startswith("list["):
        return _format_list(value)
    if value is None and not spec.choices:
        return ""
    return value


# ---- small HTML pieces ---------------------------------------------------------------------------
STATUS_COLORS = {
    "queued": "#6b7280", "starting": "#2563eb", "running": "#2563eb", "stopping": "#d97706",
    "succeeded": "#16a34a", "failed": "#dc2626", "stopped": "#d97706", "lost": "#9333ea",
    "cancelled": "#6b7280", "done": "#16a34a",
}


def status_badge(status: str) -> str:
    color = STATUS_COLORS.get(status, "#6b7280")
    return f'<span class="status-badge" style="background:{color}">{html.escape(status)}</span>'


def progress_bar(fraction: float | None, text: str = "") -> str:
    """A plain HTML progress bar; fraction None shows an empty track with the text."""
    pct = 0.0 if fraction is None else max(0.0, min(1.0, fraction)) * 100
    return (f'<div class="studio-progress" data-pct="{pct:.0f}"><div class="bar" style="width:{pct:.1f}%"></div>'
            f'<span class="label">{html.escape(text)}</span></div>')


def message(text: str, kind: str = "info") -> str:
    """A short notice line ('info', 'ok', 'error'); empty text shows nothing."""
    if not text:
        return ""
    return f'<div class="studio-msg {kind}">{html.escape(text)}</div>'


def scroll_into_sight(selector: str) -> str:
    """JS for an event's `js=`: bring an element into sight when it is off-screen or low on it (the
    result of a button far down a long form); an element already in the upper half stays put."""
    return (f"() => {{ const el = document.querySelector({selector!r}); if (!el) return;"
            " const top = el.getBoundingClientRect().top;"
            " if (top < 0 || top > window.innerHeight / 2) el.scrollIntoView({behavior: 'smooth', block: 'start'}); }")


def scroll_to_end(selector: str) -> str:
    """JS: scroll a text box to its last line once Gradio has drawn the new text (a log reads from its end)."""
    return (f"() => {{ setTimeout(() => {{ const box = document.querySelector({selector!r});"
            " if (box) box.scrollTop = box.scrollHeight; }, 60); }")


def timing_parts(timings: dict[str, Any] | None) -> list[tuple[str, float]]:
    """(stage, seconds) of a generation's timings ('load_s' -> 'load'), in the order they were taken."""
    return [(key.removesuffix("_s").replace("_", " "), float(value)) for key, value in (timings or {}).items()
            if key.endswith("_s") and isinstance(value, (int, float))]


def timings_table(timings: dict[str, Any] | None) -> str:
    """A generation's timings as a small table: seconds per stage, then the total."""
    parts = timing_parts(timings)
    if not parts:
        return ""
    rows = [*parts, ("total", sum(seconds for _, seconds in parts))]
    body = "".join(f"<tr><th>{html.escape(stage)}</th><td>{seconds:.2f} s</td></tr>" for stage, seconds in rows)
    return f"<table class='details timings'>{body}</table>"


# ---- LoRA stack editor -----------------------------------------------------------------------------
MAX_LORA_ROWS = 8


@dataclass
class LoraStack:
    """Up to MAX_LORA_ROWS rows of (LoRA reference, weight); rows appear with "Add LoRA"."""

    rows: list[gr.Row]
    refs: list[gr.Dropdown]
    weights: list[gr.Slider]
    visible: gr.State
    add: gr.Button

    @classmethod
    def build(cls) -> "LoraStack":
        rows, refs, weights, removes = [], [], [], []
        visible = gr.State(0)
        for i in range(MAX_LORA_ROWS):
            with gr.Row(visible=False, equal_height=True, elem_classes=["lora-row"]) as row:
                # The picker gets the room: its labels end with the save (epochN/stepN).
                ref = gr.Dropdown(choices=[], label=f"LoRA {i + 1}", allow_custom_value=True, scale=3,
                                  min_width=260, elem_id=f"lora-ref-{i}")
                weight = gr.Slider(*LIMITS["lora_weight"], value=1.0, step=0.05, label="weight", scale=1,
                                   min_width=150, elem_id=f"lora-weight-{i}")
                remove = gr.Button("✕", size="sm", scale=0, min_width=40, elem_id=f"lora-remove-{i}")
            rows.append(row), refs.append(ref), weights.append(weight), removes.append(remove)
        add = gr.Button("+ Add LoRA", size="sm", elem_id="lora-add")
        stack = cls(rows=rows, refs=refs, weights=weights, visible=visible, add=add)

        def show(count: int):
            return [count] + [gr.update(visible=i < count) for i in range(MAX_LORA_ROWS)]

        add.click(lambda n: show(min(MAX_LORA_ROWS, n + 1)), visible, [visible, *rows], queue=False,
                  api_visibility="private")
        for i, remove in enumerate(removes):
            remove.click(lambda n, *vals, i=i: stack._remove(i, n, vals), [visible, *refs, *weights],
                         [visible, *rows, *refs, *weights], queue=False, api_visibility="private")
        return stack

    def _remove(self, index: int, count: int, values: tuple) -> list[Any]:
        refs, weights = list(values[:MAX_LORA_ROWS]), list(values[MAX_LORA_ROWS:])
        del refs[index], weights[index]
        refs.append(None), weights.append(1.0)
        count = max(0, count - 1)
        return [count, *[gr.update(visible=i < count) for i in range(MAX_LORA_ROWS)], *refs, *weights]

    @property
    def components(self) -> list[gr.components.Component]:
        return [self.visible, *self.refs, *self.weights]

    @staticmethod
    def read(count: int, values: list[Any]) -> list[dict[str, Any]]:
        """[{'lora': ref, 'weight': w}] of the visible, filled rows (values = refs then weights)."""
        refs, weights = values[:MAX_LORA_ROWS], values[MAX_LORA_ROWS:]
        return [{"lora": refs[i], "weight": float(weights[i])} for i in range(count or 0) if refs[i]]

    @staticmethod
    def fill(loras: list[dict[str, Any]]) -> list[Any]:
        """Values for [visible, *refs, *weights, *rows] showing `loras`."""
        loras = loras[:MAX_LORA_ROWS]
        refs = [l["lora"] for l in loras] + [None] * (MAX_LORA_ROWS - len(loras))
        weights = [float(l.get("weight", 1.0)) for l in loras] + [1.0] * (MAX_LORA_ROWS - len(loras))
        return [len(loras), *refs, *weights, *[gr.update(visible=i < len(loras)) for i in range(MAX_LORA_ROWS)]]
