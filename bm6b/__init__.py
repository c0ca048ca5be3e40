"""bm6b: bilingual (Chinese-English) image-text corpus curation with Apache Beam, and a trainer."""

__version__ = "0.1.0"
