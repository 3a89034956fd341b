"""The GPUs tab: per-GPU table with what holds each GPU, and utilization/memory/power history per GPU;
on a machine without GPUs, who holds each CPU slot and the host's CPU load and RAM history."""
from __future__ import annotations

from typing import Any

import gradio as gr

from studio.api import StudioApi
from studio.http_api import request_user
from studio.context import StudioContext
from studio.plots import gpu_history_figure, host_history_figure
from tabs.timers import TabTimers

GPU_COLUMNS = ["GPU", "Name", "Memory (GiB)", "Utilization %", "Temp °C", "Power W", "Job or worker"]
SLOT_COLUMNS = ["CPU slot", "Job or worker"]
TAB_LABEL = "GPUs"  # the tab's label in studio.shell
TAB_ID = "gpus"


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "—" if value is None else fmt.format(value)


def _gpu_row(g: dict[str, Any]) -> list[Any]:
    used, total = g["memory_used_mib"], g["memory_total_mib"]
    memory = f"{_num(used and used / 1024, '{:.1f}')} / {_num(total and total / 1024, '{:.1f}')}"
    return [g["index"], g["name"], memory, _num(g["utilization_pct"]), _num(g["temperature_c"]),
            _num(g["power_w"]), g["job"] or "free"]


def _slot_rows(status: dict[str, Any]) -> list[list[str]]:
    return [[slot["slot"], slot["job"] or "free"] for slot in status.get("cpu_slots", [])]


def _host_line(status: dict[str, Any]) -> str:
    line = (f"**Host RAM** {status['host_ram_used_gib']:.1f} / {status['host_ram_total_gib']:.1f} GiB used · "
            f"**Free disk (data dir)** {status['disk_free_gib']:.1f} of {status['disk_total_gib']:.0f} GiB")
    if status.get("cpu_load_pct") is not None:
        line += f" · **CPU load** {status['cpu_load_pct']:.0f}% of {status.get('cpu_count') or '?'} cores"
    if status["gpus"]:
        line += (" · **FlashAttention-3** installed" if status["flash_attention_3"] else
                 " · **FlashAttention-3** not installed (`make flash3`: faster training and generation on H100/H200)")
    return line


def machine_view(ctx: StudioContext, status: dict[str, Any]) -> tuple[str, list[list[Any]], list[list[str]], Any]:
    """(host line, GPU rows, CPU slot rows, history figure): per GPU with GPUs, the host's CPU without."""
    history = (gpu_history_figure(ctx.gpu_history.snapshot()) if status["gpus"]
               else host_history_figure(ctx.gpu_history.host_snapshot()))
    return _host_line(status), [_gpu_row(g) for g in status["gpus"]], _slot_rows(status), history


def build(ctx: StudioContext, api: StudioApi, timers: TabTimers, tabs: gr.Tabs | None = None) -> None:
    host = gr.Markdown(elem_id="gpus-host")
    no_gpu = gr.Markdown("No GPU found on this machine (no `nvidia-smi`): training and generation run on "
                         "CPU slots, one job per slot.", visible=False, elem_id="gpus-none")
    table = gr.Dataframe(headers=GPU_COLUMNS, interactive=False, elem_id="gpus-table")
    slots = gr.Dataframe(headers=SLOT_COLUMNS, interactive=False, visible=False, elem_id="gpus-slots")
    history = gr.Plot(label="Last minutes", elem_id="gpus-history")
    timer = timers.new(TAB_ID, max(2.0, ctx.settings.poll_interval_s * 2))

    def refresh(request: gr.Request):
        status = api.gpu_status(request_user(api, request))
        has_gpus = bool(status["gpus"])
        line, gpu_rows, slot_rows, figure = machine_view(ctx, status)
        return (line, gr.update(visible=not has_gpus), gr.update(value=gpu_rows, visible=has_gpus),
                gr.update(value=slot_rows, visible=not has_gpus), figure)

    outputs = [host, no_gpu, table, slots, history]
    timer.tick(refresh, None, outputs, queue=False, show_progress="hidden", api_visibility="private")
    if tabs is not None:  # at once when the tab opens, not at the timer's next tick
        def on_tab(evt: gr.SelectData, request: gr.Request):
            return refresh(request) if evt.value == TAB_LABEL else tuple(gr.skip() for _ in outputs)

        tabs.select(on_tab, None, outputs, queue=False, show_progress="hidden", api_visibility="private")
