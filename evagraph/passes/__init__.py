"""The compiler passes, in the order the data flows through them.

capture -> layer_graph -> select -> probe -> (a calibration pipeline, ``evagraph.pipelines``,
streams the batches; it re-runs allocate) -> allocate -> rewrite
"""
