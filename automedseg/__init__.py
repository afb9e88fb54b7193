"""automedseg: self-configuring medical image segmentation that plans for the machine and time it is given."""

__version__ = "0.1.0"
