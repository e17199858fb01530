"""Stopping what a test started, and nothing else (see ``sertune.bench.faults``): processes of
one session (started with ``start_new_session=True``) and Ray processes naming one temp dir.
Tests never run ``ray stop`` or ``pkill``: other work shares the machine."""

from sertune.bench.faults import kill_owned, owned, processes

__all__ = ["kill_owned", "owned", "processes"]
