"""`--dist loadgroup` that survives a crashed worker: pytest-xdist 3.8.0's scheduler deadlocks the run
after it replaces a worker that died (the CI run of 091bf0d hung at 99 % until its 90-min limit).

Three faults of `LoadScopeScheduling` (xdist issues #1323, #1327, #1371, #1378), fixed here:
- the dead worker's finished work units were queued again; sent as empty work, they never complete,
  so nothing reschedules and every worker waits for ever;
- the test the worker died on was queued again, so a test that kills its process kills the next one;
- a worker given a single test waits for a second one (it needs the next item before it runs one) that
  is only sent when a test completes.
And one race of its own: a dying worker's last report can arrive before xdist notices the death; work
sent to it then fails with OSError (INTERNALERROR). Such a worker gets nothing more; the units already
given to it go back to the queue when xdist removes it.

Also: pytest 9 keeps a node's id in `_id`, while xdist 3.8.0's worker writes the `@group` suffix to
`_nodeid`, so `--dist loadgroup` grouped nothing (each module-scoped fixture of a grouped module was
built on both workers). `pytest_collection_modifyitems` below writes the suffix where pytest 9 reads it.
"""

from __future__ import annotations

import pytest
from _pytest.nodeid import NodeId
from xdist.scheduler import LoadGroupScheduling


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items) -> None:
    """On a loadgroup worker: `<nodeid>@<groups>` for every test marked `xdist_group` (xdist's rule)."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(groups)
        if groups and not item.nodeid.endswith(suffix):
            item._id = NodeId.parse(item.nodeid + suffix)


class CrashSafeLoadGroupScheduling(LoadGroupScheduling):
    def __init__(self, config, log=None):
        super().__init__(config, log)
        self.unreachable: set = set()   # workers a send failed to (dead; not yet removed by xdist)

    def remove_node(self, node):
        self.unreachable.discard(node)
        workload = self.assigned_work.pop(node)
        unfinished = {scope: unit for scope, unit in workload.items() if not all(unit.values())}
        if not unfinished:
            return None
        crashitem = next(nodeid for unit in unfinished.values()
                         for nodeid, done in unit.items() if not done)
        for unit in unfinished.values():   # reported as crashed by xdist; not run again
            unit.pop(crashitem, None)
        self.workqueue.update({scope: unit for scope, unit in unfinished.items() if unit})
        for other in self.assigned_work:
            self._reschedule(other)
        return crashitem

    def _reschedule(self, node) -> None:
        if node.shutting_down or node in self.unreachable:
            return
        # Top the worker up to 3 pending tests, as xdist does, but in a loop: a worker runs a test only
        # once the next one has arrived. It is told to finish as soon as nothing is left to hand out.
        try:
            while self.workqueue and self._pending_of(self.assigned_work[node]) <= 2:
                self._assign_work_unit(node)   # the unit is recorded as the worker's before the send
            if not self.workqueue:
                node.shutdown()
        except OSError:   # its channel is closed: the worker died; remove_node requeues its units
            self.unreachable.add(node)


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "loadgroup":
        return CrashSafeLoadGroupScheduling(config, log)
    return None
