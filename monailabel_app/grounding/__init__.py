"""Where each finding is, on the image's own pixels or voxels: attention maps on the token grid and back
(:mod:`maps`, :mod:`ct_maps`), anatomy found in the image for the gates (:mod:`anatomy`), and how far a
finding reaches, read from the image around the attention's choice or a click (the rule in :mod:`extent`; a CT's
search and growth in :mod:`ct_extent`, a film's in :mod:`film_extent`)."""
