"""Floor 8: RESULTS.md: the seed runs collected, the record merged, the tables and figures rendered, the regression check."""
