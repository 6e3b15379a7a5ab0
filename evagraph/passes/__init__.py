"""The compiler passes, in the order the data flows through them.

capture -> layer_graph -> select -> probe -> incremental_svd (uses allocate) -> allocate -> rewrite
"""
