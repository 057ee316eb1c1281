"""The only place this project reads JAX's private state, where no public API says it:

- which process this is, and the coordination service's key-value client, after
  ``jax.distributed.initialize`` and before a backend starts (``jax.process_index()`` starts one);
- whether an environment JAX's own cluster detection knows (SLURM, Open MPI, a Cloud TPU, ...) is
  present, i.e. whether ``jax.distributed.initialize()`` without arguments can join one.

``tests/test_parallel.py::test_jax_private_state_is_where_this_module_reads_it`` fails when a JAX
release moves these, before any of their users silently misbehaves.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Joined(NamedTuple):
    """A joined multi-process run, as ``jax.distributed`` holds it."""

    client: Any  # the coordination service's client: key_value_set, key_value_try_get
    process_id: int
    num_processes: int


def joined() -> Joined | None:
    """This process's run after ``jax.distributed.initialize`` (None before, or in a one-process run)."""
    from jax._src import distributed

    state = distributed.global_state
    return None if state.client is None else Joined(state.client, state.process_id, state.num_processes)


def cluster_environments() -> list:
    """The cluster environments JAX detects without being told (``ClusterEnv`` subclasses that are
    not opt-in only), each with ``is_env_present()``."""
    from jax._src.clusters import ClusterEnv

    return [env for env in ClusterEnv._cluster_types if not env.opt_in_only_method]
