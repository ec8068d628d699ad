"""Results over time: the parquet history, regression thresholds, the HTML report and the
nightly matrix that feeds them."""
