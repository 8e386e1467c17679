"""One helper for the CUDA-graph capture tests (GPU only)."""
import torch


def graph_replay_and_eager(step):
    """Run ``step()`` eagerly on a side stream (compiling its kernels outside any capture), then
    capture it in a CUDA graph and replay once. Returns (replayed output, eager output)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        expected = step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    return out, expected
