// UNTESTED: Java 17 and Maven exist on pipeserve's build machines, but Maven Central does not, so
// this was never compiled. A sketch of calling pipeserve from Java with classes that
// protobuf-maven-plugin generates from protos/ (pom.xml beside this file).
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.StatusRuntimeException;
import io.grpc.health.v1.HealthCheckRequest;
import io.grpc.health.v1.HealthGrpc;
import io.grpc.stub.MetadataUtils;
import java.util.Iterator;
import java.util.concurrent.TimeUnit;
import pipeserve.v1.TextClassification.ClassifyRequest;
import pipeserve.v1.TextClassification.ClassifyResponse;
import pipeserve.v1.TextClassificationServiceGrpc;
import pipeserve.v1.TextGeneration.GenerateStreamRequest;
import pipeserve.v1.TextGeneration.GenerateStreamResponse;
import pipeserve.v1.TextGenerationServiceGrpc;

public final class PipeserveExample {
  public static void main(String[] args) throws InterruptedException {
    ManagedChannel channel = ManagedChannelBuilder.forTarget("localhost:8001").usePlaintext().build();
    try {
      // With --auth-token on the server.
      Metadata headers = new Metadata();
      headers.put(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer s3cret");

      System.out.println("readiness: " + HealthGrpc.newBlockingStub(channel)
          .check(HealthCheckRequest.newBuilder().setService("readiness").build()).getStatus());

      var classifier = TextClassificationServiceGrpc.newBlockingStub(channel)
          .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(headers))
          .withDeadlineAfter(10, TimeUnit.SECONDS);
      try {
        ClassifyResponse reply = classifier.classify(ClassifyRequest.newBuilder()
            .addInputs("I love this").addInputs("I hate bugs").setTopK(2).build());
        reply.getResultsList().forEach(result -> result.getLabelsList().forEach(
            label -> System.out.printf("%s %.3f%n", label.getLabel(), label.getScore())));
      } catch (StatusRuntimeException e) {
        System.err.println(e.getStatus().getCode() + ": " + e.getStatus().getDescription());
      }

      // Streaming generation: a blocking iterator over the server's messages.
      Iterator<GenerateStreamResponse> stream = TextGenerationServiceGrpc.newBlockingStub(channel)
          .withDeadlineAfter(60, TimeUnit.SECONDS)
          .generateStream(GenerateStreamRequest.newBuilder().setInput("Once upon a time").build());
      stream.forEachRemaining(piece -> System.out.print(piece.getText()));
      System.out.println();
    } finally {
      channel.shutdown().awaitTermination(5, TimeUnit.SECONDS);
    }
  }
}
