"""How `pytest -n N` shares the suite between its workers (used by conftest.py).

xdist's default (`--dist load`) deals single tests round-robin, so the tests of one file
land on both workers and every module-scoped fixture (a whole digits pipeline, converted
checkpoints, compiled samplers) is built twice. Here a whole file goes to one worker, the
costliest file first (longest-processing-time first: the long files start at once and the
short ones fill the gaps at the end), and a worker gets its next file only when it has
nothing left to run, so no file waits queued behind a long one while another worker idles.
"""

from __future__ import annotations

from xdist.scheduler import LoadScopeScheduling

# Rough seconds per file on the 2-core CI machine (its tests and fixtures together), from
# the fresh-clone CI run of 2026-11-30 (`--durations`); only the order matters. A file not
# listed (a new one) counts as DEFAULT_COST: after the long files, before the quick ones.
FILE_COST = {
    "test_multiprocess.py": 330,
    "test_digits_pipeline.py": 150,
    "test_meissonic_reward.py": 135,
    "test_families.py": 130,
    "test_meissonic_sampling.py": 95,
    "test_meissonic_distill.py": 90,
    "test_t2i_pipeline.py": 70,
    "test_gan.py": 75,
    "test_at_scale.py": 50,
    "test_distill.py": 45,
    "test_lean_grads.py": 45,
    "test_reward_tteo.py": 45,
    "test_distill_adapters.py": 45,
    "test_t2i_reward.py": 40,
    "test_meissonic.py": 40,
    "test_fid_eval.py": 30,
    "test_aot.py": 35,
    "test_run_faults.py": 30,
    "test_lfq.py": 1,
    "test_stats.py": 1,
    "test_conversion_core.py": 1,
    "test_package_structure.py": 1,
    "test_torch_pickle.py": 1,
    "test_wordpiece.py": 1,
}
DEFAULT_COST = 10.0


def file_cost(scope: str) -> float:
    return FILE_COST.get(scope.rsplit("/", 1)[-1], DEFAULT_COST)


class CostliestFileFirst(LoadScopeScheduling):
    """LoadScopeScheduling with a file as the unit, the costliest unit next, and no
    prefetch: a worker holds back its last test until it knows the next one (pytest needs
    `nextitem` to tear down fixtures), so one pending test means the worker is idle."""

    def _split_scope(self, nodeid: str) -> str:
        return nodeid.split("::", 1)[0]

    def _assign_work_unit(self, node) -> None:
        # Equal costs keep xdist's order (files with more tests first).
        scope = max(self.workqueue, key=file_cost)
        work_unit = self.workqueue.pop(scope)
        self.assigned_work.setdefault(node, {})[scope] = work_unit
        collection = self.registered_collections[node]
        node.send_runtest_some([collection.index(nodeid) for nodeid, done in work_unit.items() if not done])

    def _reschedule(self, node) -> None:
        if node.shutting_down:
            return
        if not self.workqueue:
            node.shutdown()
            return
        if self._pending_of(self.assigned_work[node]) > 1:
            return
        self._assign_work_unit(node)
