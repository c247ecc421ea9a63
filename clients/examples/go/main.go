// UNTESTED: no Go toolchain on pipeserve's build machines. A sketch of calling pipeserve from Go
// with code generated from protos/ (see README.md beside this file).
package main

import (
	"context"
	"fmt"
	"log"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	pb "example.com/pipeserve-example/gen/pipeserve/v1"
)

func main() {
	// "localhost:8001", or "unix:///run/pipeserve/pipeserve.sock" beside a sidecar.
	conn, err := grpc.NewClient("localhost:8001", grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// With --auth-token on the server:
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer s3cret")

	health, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: "readiness"})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("readiness:", health.GetStatus())

	topK := int32(2)
	reply, err := pb.NewTextClassificationServiceClient(conn).Classify(ctx, &pb.ClassifyRequest{
		Inputs: []string{"I love this", "I hate bugs"},
		TopK:   &topK,
	})
	if err != nil {
		log.Fatal(err) // status.Code(err) is codes.NotFound, codes.InvalidArgument, ...
	}
	for i, result := range reply.GetResults() {
		for _, label := range result.GetLabels() {
			fmt.Printf("input %d: %s %.3f\n", i, label.GetLabel(), label.GetScore())
		}
	}

	// Streaming generation: one message per step of new text.
	stream, err := pb.NewTextGenerationServiceClient(conn).GenerateStream(ctx, &pb.GenerateStreamRequest{
		Input: "Once upon a time",
	})
	if err != nil {
		log.Fatal(err)
	}
	for {
		piece, err := stream.Recv()
		if err != nil {
			break // io.EOF at the end
		}
		fmt.Print(piece.GetText())
	}
	fmt.Println()
}
