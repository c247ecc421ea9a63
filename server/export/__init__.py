"""`pipeserve export`: turns an eager model of the repository into artefacts other backends serve.

- torchscript: a traced `model.pt` as a new version of the sibling model `<model>-torchscript`,
  served by backends/torchscript.py with torch.jit.load.
- tensorrt: an ONNX model and a Triton repository entry (platform tensorrt_plan, with the trtexec
  command that builds the plan on a GPU machine), and the pipeserve model `<model>-tensorrt`
  whose Triton backend calls it.

Both start from `ExportSource` (source.py): the eager model exactly as the server would load it,
the tensors its task sends, and example batches made from those names.
"""
