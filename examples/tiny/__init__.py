"""``make demo-tiny``: a tiny offline model, its demo data and its evaluation."""
