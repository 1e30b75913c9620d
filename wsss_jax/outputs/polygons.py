"""Class regions of a mask as polygons, for GeoJSON that QuPath and other pathology tools import.

Each region's boundary is traced along pixel edges (a pixel (r, c) is the square [c, c+1] x
[r, r+1]), so the rings are exact: outer boundaries run counter-clockwise in (x, y) with y down
(GeoJSON's exterior orientation once y is read as up), holes clockwise. Pixels that touch only at
a corner belong to separate rings (4-connectivity). Rings are then simplified by Douglas-Peucker
with a tolerance in output pixels.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

# a directed edge keeps the region on its left; directions indexed right, down, left, up
# (moves in (dx, dy) with y down), so a left turn from direction d is (d + 3) % 4
_MOVES = np.array([(1, 0), (0, 1), (-1, 0), (0, -1)])


def boundary_edges(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The directed boundary edges of `binary`: start vertices (n, 2) as (x, y) and directions
  (n,), top sides first in raster order (so each ring's first edge in this order is its
  top-left-most top side)."""
  padded = np.pad(binary.astype(bool), 1)
  inside = padded[1:-1, 1:-1]
  sides = [  # (pixel side exposed, offset of the edge's start vertex from (x, y), direction)
      (inside & ~padded[:-2, 1:-1], (1, 0), 2),   # top: (x+1, y) -> (x, y)
      (inside & ~padded[2:, 1:-1], (0, 1), 0),    # bottom: (x, y+1) -> (x+1, y+1)
      (inside & ~padded[1:-1, :-2], (0, 0), 1),   # left: (x, y) -> (x, y+1)
      (inside & ~padded[1:-1, 2:], (1, 1), 3)]    # right: (x+1, y+1) -> (x+1, y)
  starts, directions = [], []
  for exposed, (ox, oy), direction in sides:
    ys, xs = np.nonzero(exposed)
    starts.append(np.stack([xs + ox, ys + oy], 1))
    directions.append(np.full(len(xs), direction))
  return np.concatenate(starts).astype(np.int64), np.concatenate(directions)


def _successors(starts: np.ndarray, directions: np.ndarray, width: int):
  """Index of the edge that follows each edge along its ring, and the pairs of edges that leave
  one vertex (regions touching at a corner: there the left turn is taken, which keeps the
  region on the left and corner-touching regions apart, 4-connectivity)."""
  key = starts[:, 1] * (width + 2) + starts[:, 0]
  ends = starts + _MOVES[directions]
  end_key = ends[:, 1] * (width + 2) + ends[:, 0]
  order = np.argsort(key, kind="stable")
  lo = np.searchsorted(key[order], end_key, "left")
  count = np.searchsorted(key[order], end_key, "right") - lo
  first = order[lo]
  second = order[np.minimum(lo + 1, len(order) - 1)]
  turn_left = (directions + 3) % 4
  shared = np.flatnonzero(key[order][1:] == key[order][:-1])
  return (np.where((count == 2) & (directions[first] != turn_left), second, first),
          (order[shared], order[shared + 1]))


def _ring_order(successor: np.ndarray):
  """Each edge's ring (the ring's smallest edge index), its position along the ring from
  there, by pointer jumping (log2 n vectorised rounds instead of a walk edge by edge), and its
  predecessor."""
  n = len(successor)
  rounds = max(1, int(np.ceil(np.log2(max(n, 2)))) + 1)
  ring, jump = np.arange(n), successor.copy()
  for _ in range(rounds):   # after round k: the minimum over 2^k successors
    ring = np.minimum(ring, ring[jump])
    jump = jump[jump]
  predecessor = np.empty(n, np.int64)
  predecessor[successor] = np.arange(n)
  leader = ring == np.arange(n)
  back = np.where(leader, np.arange(n), predecessor)   # list ranking towards each ring's leader
  position = (~leader).astype(np.int64)
  for _ in range(rounds):
    position = position + position[back]
    back = back[back]
  return ring, position, predecessor


def _split_pinches(ring: np.ndarray) -> list[np.ndarray]:
  """An unclosed ring that passes a vertex more than once (8-connected background at a corner)
  as rings touching there, as simple features want (a hole may touch its shell or another hole
  at one point; a ring may not touch itself): each return to a vertex on the path so far closes
  the loop since then as a ring of its own."""
  path: list = []
  where: dict = {}
  rings = []
  for vertex in map(tuple, ring.tolist()):
    if vertex in where:
      i = where[vertex]
      rings.append(np.asarray(path[i:], np.float64))
      for v in path[i + 1:]:
        del where[v]
      del path[i + 1:]
    else:
      where[vertex] = len(path)
      path.append(vertex)
  return rings + [np.asarray(path, np.float64)]


def _corners(ring: np.ndarray) -> np.ndarray:
  """The closed ring through the vertices of an unclosed rectilinear ring where it turns."""
  prev, nxt = np.roll(ring, 1, 0), np.roll(ring, -1, 0)
  cross = ((ring[:, 0] - prev[:, 0]) * (nxt[:, 1] - ring[:, 1]) -
           (ring[:, 1] - prev[:, 1]) * (nxt[:, 0] - ring[:, 0]))
  kept = ring[cross != 0]
  return np.concatenate([kept, kept[:1]])


def trace_rings(binary: np.ndarray) -> list[np.ndarray]:
  """Closed rings (n + 1, 2) of (x, y) vertices, collinear vertices dropped."""
  starts, directions = boundary_edges(binary)
  if not len(starts):
    return []
  successor, (a, b) = _successors(starts, directions, binary.shape[1])
  ring, position, predecessor = _ring_order(successor)
  pinched = set(ring[a][ring[a] == ring[b]].tolist())  # rings through a vertex twice
  corner = directions != directions[predecessor]   # a ring's vertices where it turns
  order = np.lexsort((position, ring))
  splits = np.flatnonzero(np.diff(ring[order])) + 1
  rings = []
  for edges in np.split(order, splits):
    if ring[edges[0]] in pinched:
      rings += [_corners(part) for part in _split_pinches(starts[edges].astype(np.float64))]
    else:
      kept = starts[edges[corner[edges]]].astype(np.float64)
      rings.append(np.concatenate([kept, kept[:1]]))
  return rings


def signed_area(ring: np.ndarray) -> float:
  """Shoelace area in (x, y) with y down: positive for this module's outer rings."""
  x, y = ring[:, 0], ring[:, 1]
  return float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) / 2) * -1


def simplify_rings(rings: list[np.ndarray], tolerance: float) -> list[np.ndarray]:
  """Douglas-Peucker on closed rings (each kept closed, at least a triangle), all rings at
  once: each round splits every open segment of every ring at its farthest point beyond
  `tolerance`, so the rounds are the recursion's depth rather than its calls."""
  if tolerance <= 0 or not rings:
    return rings
  lengths = np.array([len(r) for r in rings])
  points = np.concatenate(rings)
  first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  last = first + lengths - 1            # the closing copy of the first point
  index = np.arange(len(points))
  owner = np.repeat(np.arange(len(rings)), lengths)
  keep = np.zeros(len(points), bool)
  keep[first] = keep[last] = True
  # each ring is first split at its point farthest from the start, as the recursion would
  reach = np.hypot(*(points - points[first][owner]).T)
  order = np.lexsort((-reach, owner))
  far = order[np.searchsorted(owner[order], np.arange(len(rings)))]
  keep[far] = True
  while True:
    before = np.maximum.accumulate(np.where(keep, index, 0))
    after = np.minimum.accumulate(np.where(keep, index, len(points))[::-1])[::-1]
    a, b = points[before], points[after]
    ab = b - a
    norm = np.hypot(ab[:, 0], ab[:, 1])
    dist = np.abs(ab[:, 0] * (points[:, 1] - a[:, 1]) - ab[:, 1] * (points[:, 0] - a[:, 0]))
    dist = np.where(keep, -1.0, dist / np.where(norm > 0, norm, 1.0))
    # per segment (named by its kept start), its farthest point if beyond the tolerance
    order = np.lexsort((-dist, before))
    heads = order[np.r_[True, before[order][1:] != before[order][:-1]]]
    split = heads[dist[heads] > tolerance]
    if not len(split):
      break
    keep[split] = True
  out = []
  for ring, kept in zip(rings, np.split(keep, np.cumsum(lengths)[:-1])):
    out.append(ring[kept] if kept.sum() >= 4 else ring)
  return out


def simplify(ring: np.ndarray, tolerance: float) -> np.ndarray:
  """Douglas-Peucker on one closed ring (see `simplify_rings`)."""
  return simplify_rings([ring], tolerance)[0]


def _left_pixel(ring: np.ndarray) -> tuple[int, int]:
  """(row, col) of the region pixel on the left of a ring's first edge."""
  step = np.sign(ring[1] - ring[0])  # the first edge's direction, a unit move
  x, y = ring[0] + 0.5 * step + 0.5 * np.array([step[1], -step[0]])
  return int(y), int(x)


def polygons(binary: np.ndarray, scale: float = 1.0, tolerance: float = 0.0) -> list[list]:
  """GeoJSON polygon coordinates ([exterior, hole, ...] per polygon) of the regions of `binary`,
  vertices multiplied by `scale` (e.g. to level-0 slide pixels), simplified by `tolerance` in
  those units."""
  rings = trace_rings(binary)
  # every ring borders one 4-connected region (the pixels on its left): each region has one
  # exterior ring, and its holes are the other rings on the same region
  regions, _ = ndimage.label(binary)
  region = [regions[_left_pixel(r)] for r in rings]
  outer = [signed_area(r) > 0 for r in rings]
  slot = {region[i]: n for n, i in enumerate(i for i in range(len(rings)) if outer[i])}
  out = [[rings[i]] for i in range(len(rings)) if outer[i]]
  for i, ring in enumerate(rings):
    if not outer[i]:
      out[slot[region[i]]].append(ring)
  flat = simplify_rings([r * scale for poly in out for r in poly], tolerance)
  coords, k = [], 0
  for poly in out:
    coords.append([r.round(2).tolist() for r in flat[k:k + len(poly)]])
    k += len(poly)
  return coords


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
