"""End-to-end jobs behind ``landscape-kernels reproduce ...``: train, record, analyse, report."""
