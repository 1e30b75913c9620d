"""What people look at or import into their own tools: `overlays` (masks blended over the image,
named columns, a legend), `mae_grid` (MAE reconstructions), `polygons` (class regions as GeoJSON
rings for QuPath), `mask_pyramid` (a slide's mask as a tiled pyramidal TIFF, written row by row).
"""
