"""Each tab's timers tick only while that tab is shown.

Every tick is a request that Gradio answers by walking the whole page's component tree; with every
tab's timers running, one open page sent about six a second whatever it showed. Tabs create their
timers here; the shell switches them when a tab is selected by the user or by an event (Gallery's
"Reuse in Infer", Infer's "Open in Gallery"). A tab that opens refreshes at once (its own select
handler), so nothing waits a whole interval for the first tick.
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

    def wire(self, tabs: dict[str, gr.Tab], switches: dict[str, list]) -> None:
        """`tabs`: tab id -> Tab; `switches`: tab id -> event dependencies that select that tab."""
        for tab_id, tab in tabs.items():
            tab.select(self.show_handler(tab_id), None, self.timers, queue=False, show_progress="hidden",
                       api_visibility="private")
        for tab_id, dependencies in switches.items():
            for dependency in dependencies:
                # success, not then: a refused switch (an error) leaves the shown tab as it was
                dependency.success(self.show_handler(tab_id), None, self.timers, queue=False,
                                   show_progress="hidden", api_visibility="private")
