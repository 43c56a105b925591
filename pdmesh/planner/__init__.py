"""Capacity planning for PD disaggregation: profile the engine, fit a latency model, simulate, plan.

* ``profile`` (``pdmesh profile``) measures prefill and decode latencies on this machine through
  ``measure`` and writes a profile JSON (``profile_file``: its schema, loading and saving);
* ``model`` fits latency models to a profile; ``capacity`` derives what one instance carries (the
  controller's ``auto`` ratio reads only ``capacity``, ``model`` and ``profile_file``: no engine);
* ``workload`` and ``simulate`` predict SLO attainment, goodput and latencies of prefill, decode and
  colocated instances (DistServe-style discrete-event simulation);
* ``search`` and ``plan`` (``pdmesh plan``) find the P:D split with the best goodput per instance.
"""
