"""Loading: model folders and index files, original single files and bundles, inspection, conversion.

Below the pipelines and above the models: it turns what is on disk or on the Hub into models, and
never builds a pipeline."""
