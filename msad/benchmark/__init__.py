"""The method benchmark (tools/compare_methods.py): paired seeds, trained in turn, and their
comparison; what the tools that train several models in a row share."""
