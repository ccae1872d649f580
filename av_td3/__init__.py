"""av-td3: TD3 from camera images in a driving simulator, with honest gradient-clipping metrics."""

__version__ = "0.1.0"
