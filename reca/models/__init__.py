"""Adapters for public UMM families. In-house models need not live here: name any class by import
path in ``model.adapter``."""
