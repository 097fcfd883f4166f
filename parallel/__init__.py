"""Model-agnostic distributed layer: process-group mesh, autograd-aware collectives, tensor-,
sequence-, context- and data-parallel primitives. Imports nothing from megassm."""
