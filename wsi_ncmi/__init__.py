"""wsi_ncmi: whole-slide MIL with NCMI."""
__version__ = "0.1.0"
