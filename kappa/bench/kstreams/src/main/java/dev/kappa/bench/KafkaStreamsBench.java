package dev.kappa.bench;

import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.BufferedWriter;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.HashMap;
import java.util.Map;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;
import org.apache.kafka.common.serialization.Deserializer;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.serialization.Serializer;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Grouped;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.state.KeyValueStore;

/**
 * The bench's job in Kafka Streams as its users write it: a grouped sum and count per key in the
 * default RocksDB store (with its changelog), one stream thread, defaults otherwise.
 *
 * <p>It stops once it has aggregated --rows records (the topic's end), closes cleanly (which
 * flushes the record cache to the store, the changelog and downstream), and writes the table it
 * last emitted as CSV (key,sum,count) for the bench's oracle check.
 */
public final class KafkaStreamsBench {
  record SumCount(double sum, long count) {}

  static final Serde<SumCount> SUM_COUNT = Serdes.serdeFrom(
      (Serializer<SumCount>) (topic, v) -> ByteBuffer.allocate(16).putDouble(v.sum()).putLong(v.count()).array(),
      (Deserializer<SumCount>) (topic, b) -> {
        ByteBuffer buffer = ByteBuffer.wrap(b);
        return new SumCount(buffer.getDouble(), buffer.getLong());
      });

  public static void main(String[] argv) throws Exception {
    Map<String, String> args = new HashMap<>();
    for (int i = 0; i + 1 < argv.length; i += 2) {
      args.put(argv[i].replaceFirst("^--", ""), argv[i + 1]);
    }
    long rows = Long.parseLong(args.get("rows"));
    Properties props = new Properties();
    props.put(StreamsConfig.APPLICATION_ID_CONFIG, "bench-kstreams-" + UUID.randomUUID().toString().substring(0, 8));
    props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, args.get("broker"));
    props.put(StreamsConfig.STATE_DIR_CONFIG, args.get("state-dir"));
    props.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, Integer.parseInt(args.getOrDefault("threads", "1")));

    ObjectMapper json = new ObjectMapper();
    AtomicLong aggregated = new AtomicLong();
    Map<String, SumCount> emitted = new ConcurrentHashMap<>();
    StreamsBuilder builder = new StreamsBuilder();
    builder.stream(args.get("topic"), Consumed.with(Serdes.String(), Serdes.ByteArray()))
        .mapValues(value -> {
          try {
            return json.readTree(value).get(args.getOrDefault("value", "amount")).asDouble();
          } catch (IOException e) {
            throw new UncheckedIOException(e);
          }
        })
        // the message key is the row's key field (kappa load --key), so no repartition is needed
        .groupByKey(Grouped.with(Serdes.String(), Serdes.Double()))
        .aggregate(
            () -> new SumCount(0.0, 0),
            (key, amount, total) -> {
              aggregated.incrementAndGet();
              return new SumCount(total.sum() + amount, total.count() + 1);
            },
            Materialized.<String, SumCount, KeyValueStore<Bytes, byte[]>>as("sums")
                .withKeySerde(Serdes.String())
                .withValueSerde(SUM_COUNT))
        .toStream()
        .foreach(emitted::put);

    AtomicReference<Throwable> failure = new AtomicReference<>();
    try (KafkaStreams streams = new KafkaStreams(builder.build(), props)) {
      streams.setUncaughtExceptionHandler(e -> {
        failure.set(e);
        return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
      });
      streams.start();
      while (aggregated.get() < rows) {
        if (failure.get() != null || streams.state() == KafkaStreams.State.ERROR
            || streams.state() == KafkaStreams.State.NOT_RUNNING) {
          System.err.println("kafka streams failed: " + failure.get() + " (state " + streams.state() + ")");
          System.exit(1);
        }
        Thread.sleep(10);
      }
      // a clean close commits: the record cache is flushed to RocksDB, the changelog and foreach
      streams.close(Duration.ofSeconds(120));
    }
    try (BufferedWriter out = Files.newBufferedWriter(Path.of(args.get("out")))) {
      out.write("key,sum,count\n");
      for (Map.Entry<String, SumCount> entry : emitted.entrySet()) {
        out.write(entry.getKey() + "," + entry.getValue().sum() + "," + entry.getValue().count() + "\n");
      }
    }
    System.out.println("aggregated " + aggregated.get() + " records into " + emitted.size() + " keys");
  }

  private KafkaStreamsBench() {}
}
