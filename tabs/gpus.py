"""The GPUs tab: per-GPU table, utilization/memory history, host RAM and free disk."""
from __future__ import annotations

from typing import Any

import gradio as gr

from studio.api import StudioApi
from studio.http_api import request_user
from studio.context import StudioContext
from studio.plots import gpu_history_figure

GPU_COLUMNS = ["GPU", "Name", "Memory (GiB)", "Utilization %", "Temp °C", "Power W", "Job"]


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "—" if value is None else fmt.format(value)


def _gpu_row(g: dict[str, Any]) -> list[Any]:
    used, total = g["memory_used_mib"], g["memory_total_mib"]
    memory = f"{_num(used and used / 1024, '{:.1f}')} / {_num(total and total / 1024, '{:.1f}')}"
    return [g["index"], g["name"], memory, _num(g["utilization_pct"]), _num(g["temperature_c"]),
            _num(g["power_w"]), g["job"] or "free"]


def _host_line(status: dict[str, Any]) -> str:
    line = (f"**Host RAM** {status['host_ram_used_gib']:.1f} / {status['host_ram_total_gib']:.1f} GiB used · "
            f"**Free disk (data dir)** {status['disk_free_gib']:.1f} of {status['disk_total_gib']:.0f} GiB")
    if status["cpu_jobs"]:
        line += " · **CPU jobs** " + ", ".join(status["cpu_jobs"])
    if status["gpus"]:
        line += (" · **FlashAttention-3** installed" if status["flash_attention_3"] else
                 " · **FlashAttention-3** not installed (`make flash3`: faster training and generation on H100/H200)")
    return line


def build(ctx: StudioContext, api: StudioApi) -> None:
    host = gr.Markdown(elem_id="gpus-host")
    no_gpu = gr.Markdown("No GPU found on this machine (no `nvidia-smi`): training and generation run on "
                         "CPU slots, one job per slot.", visible=False, elem_id="gpus-none")
    table = gr.Dataframe(headers=GPU_COLUMNS, interactive=False, elem_id="gpus-table")
    history = gr.Plot(label="Utilization and memory, last minutes", elem_id="gpus-history")
    timer = gr.Timer(max(2.0, ctx.settings.poll_interval_s * 2))

    def refresh(request: gr.Request):
        user = request_user(api, request)
        status = api.gpu_status(user)
        has_gpus = bool(status["gpus"])
        return (_host_line(status), gr.update(visible=not has_gpus),
                gr.update(value=[_gpu_row(g) for g in status["gpus"]], visible=has_gpus),
                gr.update(value=gpu_history_figure(ctx.gpu_history.snapshot()), visible=has_gpus))

    timer.tick(refresh, None, [host, no_gpu, table, history], queue=False, show_progress="hidden",
               api_visibility="private")
