"""Data: raw text in (sources, the embedded stdlib corpus), cleaning and curation, packing, loading."""
