"""What the recipe names, fetched and pinned: cache, sources, debian archive, lock."""
