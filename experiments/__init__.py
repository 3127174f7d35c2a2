"""Research beside the plugin: studies whose code, data, results and tests live together,
apart from the package (``axolotl_otr``) and its speed and memory benchmarks (``bench``)."""
