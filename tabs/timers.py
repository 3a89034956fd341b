"""Each tab's timers tick only while that tab is shown.

Every tick is a request that Gradio answers by walking the whole page's component tree; with every
tab's timers running, one open page sent about six a second whatever it showed. Tabs create their
timers here; the shell switches them when a tab is selected by the user or by an event (Gallery's
"Reuse in Infer", Infer's "Open in Gallery"). Gallery and GPUs also refresh the moment their tab opens
(their own select handlers); Train and Infer at their next tick, within one poll interval.
"""
from __future__ import annotations

import gradio as gr


def timer_states(shown: str, owners: list[str]) -> list[gr.Timer]:
    """Updates for timers owned by `owners` (tab ids, in order): active only where the owner is shown."""
    return [gr.Timer(active=owner == shown) for owner in owners]


class TabTimers:
    def __init__(self, first_tab: str) -> None:
        self.first_tab = first_tab
        self.timers: list[gr.Timer] = []
        self.owners: list[str] = []

    def new(self, tab_id: str, interval_s: float) -> gr.Timer:
        """A timer of tab `tab_id`, running at first only if that tab is the one the page opens on."""
        timer = gr.Timer(interval_s, active=tab_id == self.first_tab)
        self.timers.append(timer)
        self.owners.append(tab_id)
        return timer

    def show_handler(self, tab_id: str):
        owners = list(self.owners)

        def show_tab_timers() -> list[gr.Timer]:
            return timer_states(tab_id, owners)

        return show_tab_timers

    def wire(self, tabs: list[gr.Tab], switches: dict[str, list]) -> None:
        """`tabs`: the page's tabs (each by its id); `switches`: tab id -> event dependencies that select it."""
        for tab in tabs:
            tab.select(self.show_handler(tab.id), None, self.timers, queue=False, show_progress="hidden",
                       api_visibility="private")
        for tab_id, dependencies in switches.items():
            for dependency in dependencies:
                # success, not then: a refused switch (an error) leaves the shown tab as it was
                dependency.success(self.show_handler(tab_id), None, self.timers, queue=False,
                                   show_progress="hidden", api_visibility="private")
