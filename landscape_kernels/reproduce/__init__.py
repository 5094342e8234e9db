"""The ``landscape-kernels reproduce`` jobs, layer 7: one module per published analysis on one job frame
(``job``), each with its report (``reports``)."""
