"""Reports: markdown tables (tables), PNG figures (figures), the [M] report (markdown) and
the [S] report (shen)."""
