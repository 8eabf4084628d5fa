"""The dataset adapters (one per dataset, read in the layout each dataset is published in), their manifests and converters."""
