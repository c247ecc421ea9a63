#!/usr/bin/env bash
# pipeserve from grpcurl (https://github.com/fullstorydev/grpcurl): the server has reflection on,
# so no .proto files are needed. Each command stands alone; tests/test_client_examples.py sends
# every one of them (its JSON body, to its method) to a live server.
# Against a TLS server: drop -plaintext, add -cacert ca.crt (and -cert/-key for mTLS); with
# --auth-token: -H 'authorization: Bearer <token>'.

# What the server offers
grpcurl -plaintext localhost:8001 list
grpcurl -plaintext localhost:8001 describe pipeserve.v1.TextClassificationService

# Health, as Kubernetes' probes ask it
grpcurl -plaintext -d '{"service": "readiness"}' localhost:8001 grpc.health.v1.Health/Check
grpcurl -plaintext -d '{"service": "liveness"}' localhost:8001 grpc.health.v1.Health/Check

# The models and their state
grpcurl -plaintext -d '{}' localhost:8001 pipeserve.v1.ModelService/ListModels

# sentiment-analysis: the default model, every label
grpcurl -plaintext -d '{"inputs": ["I love this", "I hate bugs"], "top_k": 0}' localhost:8001 pipeserve.v1.TextClassificationService/Classify

# feature-extraction: one normalised sentence embedding per input
grpcurl -plaintext -d '{"model": "minilm", "inputs": ["hello world"], "pooling": "POOLING_MEAN", "normalize": true}' localhost:8001 pipeserve.v1.FeatureExtractionService/Embed

# question-answering
grpcurl -plaintext -d '{"inputs": [{"question": "Where do I live?", "context": "My name is Sarah and I live in London"}]}' localhost:8001 pipeserve.v1.QuestionAnsweringService/Answer

# text-generation, streamed: one message per step of new text, the last with the finish reason
grpcurl -plaintext -d '{"input": "Once upon a time", "parameters": {"max_new_tokens": 16}}' localhost:8001 pipeserve.v1.TextGenerationService/GenerateStream

# KServe v2 / Open Inference Protocol: the server is live, the model ready, and an inference
# (BYTES tensors travel base64-encoded in JSON: "SSBsb3ZlIHRoaXM=" is "I love this")
grpcurl -plaintext -d '{}' localhost:8001 inference.GRPCInferenceService/ServerLive
grpcurl -plaintext -d '{"name": "sentiment"}' localhost:8001 inference.GRPCInferenceService/ModelReady
grpcurl -plaintext -d '{"model_name": "sentiment", "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "contents": {"bytes_contents": ["SSBsb3ZlIHRoaXM="]}}]}' localhost:8001 inference.GRPCInferenceService/ModelInfer
