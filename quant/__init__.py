"""Block formats, GGUF reading and writing, quantizers and the kernels that compute on quantized blocks."""
