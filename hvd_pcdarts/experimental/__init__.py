"""Options that no script turns on: kept for the benchmarks that time them on a GPU (benchmarks/RESULTS.md,
"Experimental GPU options"). The default path neither imports nor reads anything here."""
