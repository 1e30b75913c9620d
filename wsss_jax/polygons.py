"""Class regions of a mask as polygons, for GeoJSON that QuPath and other pathology tools import.

Each region's boundary is traced along pixel edges (a pixel (r, c) is the square [c, c+1] x
[r, r+1]), so the rings are exact: outer boundaries run counter-clockwise in (x, y) with y down
(GeoJSON's exterior orientation once y is read as up), holes clockwise. Pixels that touch only at
a corner belong to separate rings (4-connectivity). Rings are then simplified by Douglas-Peucker
with a tolerance in output pixels.
"""
from __future__ import annotations

import numpy as np

# a directed edge keeps the region on its left: moves in (dx, dy) with y down
_RIGHT, _DOWN, _LEFT, _UP = (1, 0), (0, 1), (-1, 0), (0, -1)


def boundary_edges(binary: np.ndarray) -> dict:
  """{start vertex (x, y): [end vertex, ...]} of the directed boundary edges of `binary`."""
  padded = np.pad(binary.astype(bool), 1)
  inside = padded[1:-1, 1:-1]
  edges: dict = {}

  def add(ys, xs, start, end):
    for y, x in zip(ys.tolist(), xs.tolist()):
      edges.setdefault((x + start[0], y + start[1]), []).append((x + end[0], y + end[1]))

  # top side of an inside pixel whose upper neighbour is outside: from (x+1, y) to (x, y)
  ys, xs = np.nonzero(inside & ~padded[:-2, 1:-1])
  add(ys, xs, (1, 0), (0, 0))
  ys, xs = np.nonzero(inside & ~padded[2:, 1:-1])     # bottom: (x, y+1) -> (x+1, y+1)
  add(ys, xs, (0, 1), (1, 1))
  ys, xs = np.nonzero(inside & ~padded[1:-1, :-2])    # left: (x, y) -> (x, y+1)
  add(ys, xs, (0, 0), (0, 1))
  ys, xs = np.nonzero(inside & ~padded[1:-1, 2:])     # right: (x+1, y+1) -> (x+1, y)
  add(ys, xs, (1, 1), (1, 0))
  return edges


def _turn_order(direction):
  """Candidate next directions at a corner two regions share: towards the region (left, with
  the region on the left) first, so regions touching at a corner stay apart (4-connectivity)."""
  dx, dy = direction
  return ((dy, -dx), direction, (-dy, dx))


def trace_rings(binary: np.ndarray) -> list[np.ndarray]:
  """Closed rings (n + 1, 2) of (x, y) vertices, collinear vertices dropped."""
  edges = boundary_edges(binary)
  rings = []
  while edges:
    start = next(iter(edges))
    ring = [start]
    point, direction = start, None
    while True:
      ends = edges[point]
      if direction is None or len(ends) == 1:
        end = ends[0]
      else:
        by_dir = {(e[0] - point[0], e[1] - point[1]): e for e in ends}
        end = next(by_dir[d] for d in _turn_order(direction) if d in by_dir)
      ends.remove(end)
      if not ends:
        del edges[point]
      direction = (end[0] - point[0], end[1] - point[1])
      point = end
      if point == start:
        break
      ring.append(point)
    rings.append(_drop_collinear(np.asarray(ring + [start], np.float64)))
  return rings


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
  closed = ring[:-1]
  prev, nxt = np.roll(closed, 1, 0), np.roll(closed, -1, 0)
  cross = (closed[:, 0] - prev[:, 0]) * (nxt[:, 1] - closed[:, 1]) - \
      (closed[:, 1] - prev[:, 1]) * (nxt[:, 0] - closed[:, 0])
  kept = closed[cross != 0]
  return np.concatenate([kept, kept[:1]])


def signed_area(ring: np.ndarray) -> float:
  """Shoelace area in (x, y) with y down: positive for this module's outer rings."""
  x, y = ring[:, 0], ring[:, 1]
  return float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) / 2) * -1


def simplify(ring: np.ndarray, tolerance: float) -> np.ndarray:
  """Douglas-Peucker on a closed ring (kept closed, at least a triangle)."""
  if tolerance <= 0 or len(ring) <= 4:
    return ring
  points = ring[:-1]
  far = int(np.argmax(np.hypot(*(points - points[0]).T)))  # split the ring at its far point
  keep = np.zeros(len(points), bool)
  keep[[0, far]] = True
  stack = [(0, far), (far, len(points))]
  while stack:
    i, j = stack.pop()
    a, b = points[i], points[j % len(points)]
    inner = points[i + 1:j]
    if not len(inner):
      continue
    ab = b - a
    norm = np.hypot(*ab) or 1.0
    dist = np.abs(ab[0] * (inner[:, 1] - a[1]) - ab[1] * (inner[:, 0] - a[0])) / norm
    k = int(np.argmax(dist))
    if dist[k] > tolerance:
      keep[i + 1 + k] = True
      stack += [(i, i + 1 + k), (i + 1 + k, j)]
  kept = points[keep]
  if len(kept) < 3:
    return ring
  return np.concatenate([kept, kept[:1]])


def _inside(point, ring: np.ndarray) -> bool:
  """Even-odd rule."""
  x, y = point
  xs, ys = ring[:-1, 0], ring[:-1, 1]
  xe, ye = ring[1:, 0], ring[1:, 1]
  crosses = ((ys > y) != (ye > y)) & (x < (xe - xs) * (y - ys) / np.where(ye == ys, 1, ye - ys)
                                      + xs)
  return bool(np.count_nonzero(crosses) % 2)


def polygons(binary: np.ndarray, scale: float = 1.0, tolerance: float = 0.0) -> list[list]:
  """GeoJSON polygon coordinates ([exterior, hole, ...] per polygon) of the regions of `binary`,
  vertices multiplied by `scale` (e.g. to level-0 slide pixels), simplified by `tolerance` in
  those units."""
  rings = trace_rings(binary)
  outer = [r for r in rings if signed_area(r) > 0]
  holes = [r for r in rings if signed_area(r) < 0]
  out = [[r] for r in outer]
  areas = [signed_area(r) for r in outer]
  for hole in holes:
    # the centre of the region pixel on the left of the hole's first edge: inside the ring
    # that holds the hole (the smallest such ring when regions nest)
    step = np.sign(hole[1] - hole[0])            # the first edge's direction, a unit move
    probe = hole[0] + 0.5 * step + 0.5 * np.array([step[1], -step[0]])  # its left pixel's centre
    holders = [i for i, ring in enumerate(outer) if _inside(probe, ring)]
    if holders:
      out[min(holders, key=lambda i: areas[i])].append(hole)
  return [[simplify(r * scale, tolerance).round(2).tolist() for r in poly] for poly in out]


def feature_collection(mask: np.ndarray, class_names, background_index: int, scale: float = 1.0,
                       tolerance: float = 0.0, colours=None) -> dict:
  """A GeoJSON FeatureCollection: one MultiPolygon feature per class present in `mask` (the
  background excluded), with QuPath's `classification` (name and colour) and `objectType`."""
  features = []
  for index, name in enumerate(class_names):
    if index == background_index or not (mask == index).any():
      continue
    coords = polygons(mask == index, scale, tolerance)
    props = {"objectType": "annotation", "classification": {"name": name}}
    if colours is not None:
      props["classification"]["color"] = [int(c) for c in colours[index]]
    features.append({"type": "Feature", "geometry": {"type": "MultiPolygon",
                                                     "coordinates": coords},
                     "properties": props})
  return {"type": "FeatureCollection", "features": features}
