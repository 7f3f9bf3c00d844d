// The orchestrator's Example-2 job done by Kafka Streams, for bench.py to compare (not part of the walkthrough).
//
// Reads the detector's member of message_stream; for each detection not handled before (its workflow entry is in a
// key-value store, whose changelog Kafka Streams keeps in Kafka), writes the three Example-2 commands (sec_command,
// notification_command, report_data) and a workflow entry of the orchestrator's size. exactly_once_v2.
// It checks less than the orchestrator: no envelope or payload validation, no per-writer type check, no time limits.
// Run by bench.py: java -cp CLASSPATH Router BOOTSTRAP PREFIX APPLICATION_ID STATE_DIR COMMIT_INTERVAL_MS (0: default)

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.time.Instant;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.Stores;

public class Router {
    static final ObjectMapper JSON = new ObjectMapper();
    static final String PAD = "x".repeat(173);  // the entry is then the size of the orchestrator's, about 740 bytes

    static class Route implements Processor<String, String, String, String> {
        private ProcessorContext<String, String> context;
        private KeyValueStore<String, String> workflows;

        @Override
        public void init(ProcessorContext<String, String> context) {
            this.context = context;
            this.workflows = context.getStateStore("workflows");
        }

        @Override
        public void process(Record<String, String> record) {
            try {
                JsonNode detection = JSON.readTree(record.value());
                String workflow = detection.get("workflow_id").asText(), id = detection.get("id").asText();
                if (workflows.get("workflow/" + workflow) != null) {
                    return;  // handled before: nothing is sent again
                }
                JsonNode payload = detection.get("payload");
                int severity = payload.get("severity").asInt();
                String zone = payload.get("zone").asText(), sensor = payload.get("sensor_id").asText();
                String kind = payload.get("kind").asText(), now = Instant.now().toString();
                ObjectNode security = command(id + ".security", "security_command", workflow, now);
                security.putObject("payload").put("action", severity >= 4 ? "dispatch_guard" : severity == 3 ? "lock_zone"
                        : "inspect").put("zone", zone).put("sensor_id", sensor).put("severity", severity);
                ObjectNode notify = command(id + ".notify", "notification_command", workflow, now);
                notify.putObject("payload").put("channel", severity >= 4 ? "pager" : "sms").put("recipient",
                        "on-duty-" + zone).put("text", kind + " at " + zone + " (sensor " + sensor + ", severity "
                        + severity + ")");
                ObjectNode report = command(id + ".report", "report_data", workflow, now);
                report.putObject("payload").put("workflow", "security").put("category", kind).put("entity", sensor)
                        .put("zone", zone);
                ObjectNode entry = JSON.createObjectNode().put("workflow_id", workflow).put("type", "security")
                        .put("stage", 2).put("state", "running").put("started_at", now);
                entry.putObject("steps").putObject("acted").put("state", "pending").put("attempts", 1)
                        .set("command", security);
                entry.putObject("handled").put(id, 1);
                entry.put("pad", PAD);
                workflows.put("workflow/" + workflow, JSON.writeValueAsString(entry));
                context.forward(record.withValue(JSON.writeValueAsString(security)), "security");
                context.forward(record.withValue(JSON.writeValueAsString(notify)), "notify");
                context.forward(record.withValue(JSON.writeValueAsString(report)), "report");
            } catch (java.io.IOException error) {
                throw new RuntimeException(error);
            }
        }

        static ObjectNode command(String id, String type, String workflow, String now) {
            return JSON.createObjectNode().put("id", id).put("type", type).put("workflow_id", workflow)
                    .put("source", "orchestrator").put("created_at", now);
        }
    }

    public static void main(String[] args) throws InterruptedException {
        String bootstrap = args[0], prefix = args[1], application = args[2], stateDir = args[3];
        long interval = Long.parseLong(args[4]);
        Properties config = new Properties();
        config.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        config.put(StreamsConfig.APPLICATION_ID_CONFIG, application);
        config.put(StreamsConfig.STATE_DIR_CONFIG, stateDir);
        config.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
        config.put(StreamsConfig.consumerPrefix("auto.offset.reset"), "earliest");
        if (interval > 0) {
            config.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, interval);
        }
        Topology topology = new Topology();
        topology.addSource("detections", Serdes.String().deserializer(), Serdes.String().deserializer(),
                prefix + "message_stream.security_detector");
        topology.addProcessor("route", Route::new, "detections");
        topology.addStateStore(Stores.keyValueStoreBuilder(Stores.persistentKeyValueStore("workflows"),
                Serdes.String(), Serdes.String()), "route");
        String[][] sinks = {{"security", "sec_command"}, {"notify", "notification_command"}, {"report", "report_data"}};
        for (String[] sink : sinks) {
            topology.addSink(sink[0], prefix + sink[1], Serdes.String().serializer(), Serdes.String().serializer(),
                    "route");
        }
        KafkaStreams streams = new KafkaStreams(topology, config);
        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            streams.close(java.time.Duration.ofSeconds(20));
            stopped.countDown();
        }));
        streams.start();
        stopped.await();
    }
}
