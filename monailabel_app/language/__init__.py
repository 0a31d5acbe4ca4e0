"""The language layer: findings from answers and reports, English and Chinese."""
